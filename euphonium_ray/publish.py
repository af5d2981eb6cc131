"""Weight publication without Ray: flat buckets, the cast to the rollout dtype, a cheap check, CUDA IPC handles.

What a weight broadcast moves is packed into a few preallocated flat buffers, one per dtype (``WeightBuckets``):
the learner casts its fp32 masters to the rollout dtype (bf16 on GPU) *on its device* while it copies them into
the bucket, so only the bytes the rollout keeps ever leave the device, and no step allocates. A receiver sees the
same bucket as named views (``unpack``). The transports in ``actors/weights.py`` move whole buckets: a pinned host
mirror for the object store, a device bucket broadcast over a collective, or a device bucket a colocated rollout
worker maps through a CUDA IPC handle (``export_ipc`` / ``import_ipc``, a thin layer over the same buckets).

The hot path has no full-state hash: ``fingerprint`` is the exact integer sum of every element's bit pattern per
bucket (order-independent, so a bucket and the tensors it was unpacked into give the same sum), a few sampled bit
patterns and the layout's hash. Any single changed element changes the sum; a stale version or a changed layout
changes the rest. It costs one read of the bytes on the device (milliseconds at 13 B parameters), where the full
SHA-256 (``checkpoint.state_digest``, still used by the tests and ``cluster.weight_digest``) takes minutes on CPU.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor

__all__ = ["ALIGN_BYTES", "BucketLayout", "Slot", "WeightBuckets", "bitsum", "export_ipc", "fingerprint",
           "fingerprint_id", "import_ipc", "published_dtype", "unpack"]

ALIGN_BYTES = 128  # every tensor starts at a multiple of this in its bucket (vectorised copies; padding is zero)
SAMPLES = 16  # sampled elements per bucket in a fingerprint
_CHUNK = 1 << 26  # elements per partial sum (bounds any temporary a reduction might make)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def published_dtype(source: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    """Floating tensors travel in ``target`` (the rollout's dtype); other tensors (step counters) as they are."""
    return target if target is not None and source.is_floating_point else source


@dataclass(frozen=True)
class Slot:
    """One tensor's place in its bucket: ``offset`` and ``numel`` in elements of ``dtype``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    numel: int


class BucketLayout:
    """Where each tensor of a state sits in the flat buckets (sorted by name; equal states give equal layouts)."""

    def __init__(self, slots: Iterable[Slot]) -> None:
        self.slots = list(slots)
        self.by_name = {s.name: s for s in self.slots}
        self.sizes: dict[str, int] = {}
        for s in self.slots:
            self.sizes[s.dtype] = max(self.sizes.get(s.dtype, 0), s.offset + s.numel)
        self.key = hashlib.sha256(json.dumps(self.to_json()).encode()).hexdigest()[:16]

    @classmethod
    def for_state(cls, state: dict[str, Tensor], dtype: torch.dtype | None = None) -> "BucketLayout":
        """The layout of ``state`` with floating tensors in ``dtype`` (None: each tensor's own dtype)."""
        ends: dict[str, int] = {}
        slots = []
        for name in sorted(state):
            t = state[name]
            d = published_dtype(t.dtype, dtype)
            align = max(ALIGN_BYTES // torch.empty(0, dtype=d).element_size(), 1)
            key = _dtype_name(d)
            offset = -(-ends.get(key, 0) // align) * align
            slots.append(Slot(name, key, tuple(int(x) for x in t.shape), offset, int(t.numel())))
            ends[key] = offset + int(t.numel())
        return cls(slots)

    def to_json(self) -> list[list[Any]]:
        return [[s.name, s.dtype, list(s.shape), s.offset, s.numel] for s in self.slots]

    @classmethod
    def from_json(cls, rows: list[list[Any]]) -> "BucketLayout":
        return cls(Slot(str(n), str(d), tuple(int(x) for x in shape), int(o), int(k)) for n, d, shape, o, k in rows)

    def nbytes(self) -> int:
        return sum(n * torch.empty(0, dtype=getattr(torch, d)).element_size() for d, n in self.sizes.items())

    def matches(self, state: dict[str, Tensor], dtype: torch.dtype | None) -> bool:
        """Whether ``state`` packs into this layout (same names, shapes and published dtypes)."""
        if set(state) != set(self.by_name):
            return False
        return all(tuple(state[s.name].shape) == s.shape
                   and _dtype_name(published_dtype(state[s.name].dtype, dtype)) == s.dtype for s in self.slots)


def unpack(buffers: dict[str, Tensor], layout: BucketLayout) -> dict[str, Tensor]:
    """Named views into the buckets (no copy)."""
    return {s.name: buffers[s.dtype][s.offset: s.offset + s.numel].view(s.shape) for s in layout.slots}


def _empty_buffers(layout: BucketLayout, device: torch.device, pin: bool) -> dict[str, Tensor]:
    pin = pin and device.type == "cpu" and torch.cuda.is_available()
    return {d: torch.zeros(n, dtype=getattr(torch, d), device=device, pin_memory=pin) for d, n in layout.sizes.items()}


class WeightBuckets:
    """Preallocated flat buffers for one layout on one device (host buffers pinned when CUDA is present), reused
    for every version: ``pack`` casts and copies a state in, ``views`` are the named tensors, ``copy_from`` moves a
    whole bucket set (one copy per dtype: device to pinned host, or device to device)."""

    def __init__(self, layout: BucketLayout, device: torch.device | str, *, pin: bool = True) -> None:
        self.layout = layout
        self.device = torch.device(device)
        self.buffers = _empty_buffers(layout, self.device, pin)
        self.views = unpack(self.buffers, layout)

    @classmethod
    def for_state(cls, state: dict[str, Tensor], dtype: torch.dtype | None, device: torch.device | str,
                  *, pin: bool = True) -> "WeightBuckets":
        return cls(BucketLayout.for_state(state, dtype), device, pin=pin)

    def nbytes(self) -> int:
        return self.layout.nbytes()

    def pack(self, state: dict[str, Tensor]) -> None:
        """Copy ``state`` into the buckets, casting each tensor on its own device first (one kernel per tensor;
        asynchronous on CUDA: synchronise before another process reads)."""
        if set(state) != set(self.layout.by_name):
            missing, extra = set(self.layout.by_name) - set(state), set(state) - set(self.layout.by_name)
            raise KeyError(f"state does not match the bucket layout: missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(extra)[:3]}")
        dst, src = [], []
        for slot in self.layout.slots:
            t = state[slot.name].detach()
            if tuple(t.shape) != slot.shape:
                raise ValueError(f"{slot.name}: shape {tuple(t.shape)} does not match the layout's {slot.shape}")
            view = self.views[slot.name]
            if t.device != view.device:  # cast where the tensor lives, so only published bytes travel
                t = t.to(view.dtype)
            dst.append(view)
            src.append(t)
        with torch.no_grad():
            try:
                torch._foreach_copy_(dst, src, non_blocking=True)
            except (RuntimeError, NotImplementedError):  # mixed devices/dtypes a fused copy does not take
                for d, s in zip(dst, src):
                    d.copy_(s, non_blocking=True)

    def copy_from(self, other: "WeightBuckets") -> None:
        """Bucket-to-bucket copy of the same layout (one copy per dtype)."""
        if other.layout.key != self.layout.key:
            raise ValueError("bucket layouts differ")
        for d, buf in self.buffers.items():
            buf.copy_(other.buffers[d], non_blocking=True)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def fingerprint(self, version: int) -> dict[str, Any]:
        return fingerprint(self.views, self.layout, version, buffers=self.buffers)


# ----------------------------------------------------------------------------------------- cheap check
def bitsum(t: Tensor) -> Tensor:
    """The exact int64 sum of the elements' bit patterns (0-dim, on ``t``'s device; wraps on overflow, the same
    way everywhere). Integer addition is associative, so any split of the elements gives the same sum."""
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    ints = flat.view(_INT_OF_SIZE[flat.element_size()])
    if ints.numel() <= _CHUNK:
        return ints.sum(dtype=torch.int64)
    return torch.stack([ints[i: i + _CHUNK].sum(dtype=torch.int64) for i in range(0, ints.numel(), _CHUNK)]).sum()


def _sample_positions(layout: BucketLayout, dtype: str, version: int, k: int) -> list[tuple[str, int]]:
    """``k`` (slot, element) positions in bucket ``dtype``, spread over it and shifted with the version."""
    slots = [s for s in layout.slots if s.dtype == dtype and s.numel > 0]
    total = sum(s.numel for s in slots)
    if total == 0:
        return []
    out = []
    for j in range(k):
        pos = (j * total // k + version * 7919 + j * 104729) % total
        for s in slots:
            if pos < s.numel:
                out.append((s.name, pos))
                break
            pos -= s.numel
    return out


def fingerprint(state: dict[str, Tensor], layout: BucketLayout, version: int, samples: int = SAMPLES,
                buffers: dict[str, Tensor] | None = None) -> dict[str, Any]:
    """The cheap check of ``state`` laid out as ``layout`` (tensors in another dtype are compared after casting to
    the layout's): per bucket dtype the bit-pattern sum and ``samples`` sampled bit patterns, plus the version and
    the layout's hash. One device synchronisation. ``buffers``: the flat buckets ``state`` is a view of (their
    padding is zero, so one sum per bucket gives the same value with fewer kernels)."""
    parts: list[Tensor] = []
    index: list[tuple[str, str]] = []
    device = next(iter(state.values())).device if state else torch.device("cpu")
    for dtype in sorted(layout.sizes):
        want = getattr(torch, dtype)
        if buffers is not None:
            sums = [bitsum(buffers[dtype])]
        else:
            sums = [bitsum(state[s.name] if state[s.name].dtype == want else state[s.name].to(want))
                    for s in layout.slots if s.dtype == dtype]
        if sums:
            parts.append(torch.stack([x.to(device) for x in sums]).sum())
            index.append((dtype, "sum"))
        for name, pos in _sample_positions(layout, dtype, version, samples):
            one = state[name].detach().reshape(-1)[pos: pos + 1].to(want)
            one = one.view(torch.uint8) if one.dtype == torch.bool else one
            parts.append(one.view(_INT_OF_SIZE[one.element_size()]).to(device=device, dtype=torch.int64).reshape(()))
            index.append((dtype, "sample"))
    values = torch.stack(parts).tolist() if parts else []  # the one synchronisation
    out: dict[str, Any] = {"version": int(version), "layout": layout.key, "sums": {}, "samples": {}}
    for (dtype, kind), value in zip(index, values):
        if kind == "sum":
            out["sums"][dtype] = int(value)
        else:
            out["samples"].setdefault(dtype, []).append(int(value))
    return out


def fingerprint_id(fp: dict[str, Any]) -> str:
    """A short string naming a fingerprint (what the learner reports as a version's digest on the hot path)."""
    return "fp:" + hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------------------- CUDA IPC
def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def export_ipc(buffers: dict[str, Tensor]) -> dict[str, Any]:
    """Picklable CUDA IPC handles of device buckets (``torch.multiprocessing``'s own reduction: the producer keeps
    the memory alive while consumers hold it), with the GPU's UUID so a consumer finds it under its own numbering."""
    from torch.multiprocessing.reductions import reduce_tensor

    first = next(iter(buffers.values()))
    return {"uuid": device_uuid(first.device), "handles": {d: reduce_tensor(b)[1]  # type: ignore[no-untyped-call]
                                                     for d, b in buffers.items()}}


def import_ipc(exported: dict[str, Any]) -> dict[str, Tensor]:
    """The producer's buckets mapped into this process (no copy). The GPU must be one this process sees."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    local = [i for i in range(torch.cuda.device_count()) if device_uuid(torch.device("cuda", i)) == exported["uuid"]]
    if not local:
        raise RuntimeError(f"CUDA IPC: the learner's GPU {exported['uuid']} is not visible to this process (it needs "
                           "the learner and the rollout worker on one GPU); set cluster.weight_sync=object_store")
    out = {}
    for dtype, args in exported["handles"].items():
        args = list(args)
        args[6] = local[0]  # storage_device: the producer's index, renumbered to ours
        out[dtype] = rebuild_cuda_tensor(*args)  # type: ignore[no-untyped-call]
    return out
