"""Versioned weight broadcast from the learner to the rollout workers.

The version is the number of optimizer passes applied (the training step): the learner publishes version k after
learning step k−1, and a rollout worker asked for ``min_version`` waits for it and refuses to sample with an
older one (``StaleWeightsError``). What moves is ``policy.sync_state_dict()`` (every tensor, or only the LoRA
tensors when the learner trains LoRA), cast to the rollout's dtype on the learner's device and packed into reused
flat buckets (``euphonium_ray.publish``); each version carries a cheap fingerprint the worker checks after loading.

Three transports behind one interface (``publish`` on the learner, ``fetch`` + ``verify`` on a rollout worker):

* ``ObjectStoreSync``: the learner copies its buckets to a reused pinned host bucket and ``ray.put``s the raw
  bytes once; every worker maps them from the object store (shared memory on one node, object transfer across
  nodes). The small ``WeightStore`` actor only holds the version number, the layout and the reference.
* ``CollectiveSync``: a torch process group of its own (gloo on CPU, NCCL on GPU; not the learner's data-parallel
  group) between the learner's rank 0 and the rollout workers; the buckets are broadcast from rank 0, so GPU
  weights go GPU to GPU. The ``WeightStore`` still carries the version and layout, and is the rendezvous point.
  Every receiver must join every broadcast, in order. NCCL refuses two members on one GPU.
* ``CudaIpcSync``: the learner and the rollout workers share one GPU; workers map the learner's persistent device
  buckets through CUDA IPC handles and copy device to device.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import warnings
from datetime import timedelta
from typing import Any, Protocol

import ray
import torch
from torch import Tensor

from euphonium_ray.errors import EuphoniumError
from euphonium_ray.publish import BucketLayout, WeightBuckets, export_ipc, fingerprint, import_ipc, unpack

__all__ = [
    "CollectiveSync",
    "CudaIpcSync",
    "ObjectStoreSync",
    "StaleWeightsError",
    "WeightCheckError",
    "WeightStore",
    "WeightSync",
    "make_weight_sync",
]


class StaleWeightsError(EuphoniumError, RuntimeError):
    """A rollout worker could not get weights at least as new as the step requires."""


@ray.remote(num_cpus=0)
class WeightStore:
    """The published versions (the newest ``keep``), and how to get each. Versions only move forward.

    Keeping the previous version too lets an async rollout ask for exactly "the learner's version minus one"
    even after the learner has moved on, so which weights a step samples with never depends on timing."""

    def __init__(self, keep: int = 3) -> None:
        self.version = -1
        self.keep = keep
        self.history: dict[int, tuple[list[Any], dict[str, Any]]] = {}
        self.rendezvous: dict[str, Any] | None = None
        self._changed = asyncio.Event()

    async def publish(self, version: int, refs: list[Any], meta: dict[str, Any]) -> int:
        if version < self.version:
            raise ValueError(f"weight version {version} is older than the published {self.version}")
        self.version = int(version)
        self.history[self.version] = (list(refs), dict(meta))
        for old in [v for v in self.history if v <= self.version - self.keep]:
            del self.history[old]
        self._changed.set()
        self._changed = asyncio.Event()
        return self.version

    async def rewind(self, version: int) -> None:
        """A restarted learner starts again at ``version``: what its lost predecessor published went with it (the
        objects were that process's), so every version is forgotten and the learner publishes again from here."""
        self.version = int(version) - 1
        self.history.clear()

    async def latest(self) -> tuple[int, list[Any], dict[str, Any]]:
        refs, meta = self.history.get(self.version, ([], {}))
        return self.version, refs, meta

    async def wait_for(self, version: int, timeout_s: float) -> tuple[int, list[Any], dict[str, Any]]:
        """Exactly ``version`` once it is published; TimeoutError after ``timeout_s``, KeyError if it is too old."""
        deadline = time.monotonic() + timeout_s
        while self.version < version:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"weight version {version} was not published within {timeout_s:.0f}s "
                                   f"(newest is {self.version})")
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=left)
            except asyncio.TimeoutError:
                pass
        if version not in self.history:
            raise KeyError(f"weight version {version} is no longer kept (newest {self.version}, keeping {self.keep})")
        refs, meta = self.history[version]
        return version, refs, meta

    async def get_version(self) -> int:
        return self.version

    async def set_rendezvous(self, info: dict[str, Any]) -> None:
        self.rendezvous = dict(info)

    async def get_rendezvous(self, timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while self.rendezvous is None:
            if time.monotonic() > deadline:
                raise TimeoutError("the learner did not open the weight-broadcast group in time")
            await asyncio.sleep(0.05)
        return self.rendezvous


class WeightSync(Protocol):
    backend: str

    def publish(self, version: int, state: dict[str, Tensor]) -> dict[str, float]: ...

    def fetch(self, min_version: int, current_version: int, timeout_s: float) -> tuple[int, dict[str, Tensor] | None]:
        ...

    def verify(self, version: int, state: dict[str, Tensor]) -> None: ...


class WeightCheckError(EuphoniumError, RuntimeError):
    """The weights a rollout worker loaded are not the ones the learner published (the cheap check disagrees)."""


class _Buckets:
    """What every transport shares: the learner's reusable buckets (cast to ``dtype`` on the learner's device, a
    pinned host mirror where a host hop is needed) and the receiver's check of what it loaded."""

    def __init__(self, dtype: torch.dtype | None) -> None:
        self.dtype = dtype
        self._device: WeightBuckets | None = None
        self._host: WeightBuckets | None = None
        self._expected: dict[int, tuple[BucketLayout, dict[str, Any]]] = {}

    def _device_buckets(self, state: dict[str, Tensor], device: torch.device) -> WeightBuckets:
        """The learner's device bucket for ``state``'s layout (allocated once; again only if the layout changes)."""
        if self._device is None or not _same_device(self._device.device, device) or \
                not self._device.layout.matches(state, self.dtype):
            self._device = None  # free the old one first
            self._device = WeightBuckets.for_state(state, self.dtype, device)
        return self._device

    def _stage(self, state: dict[str, Tensor], version: int, device: torch.device,
               host: bool) -> tuple[WeightBuckets, dict[str, Any]]:
        """Pack ``state`` into the buckets on ``device`` (cast there), fingerprint them there, and with ``host``
        copy them to the pinned host mirror. Returns the buckets to send and the fingerprint (synchronised)."""
        source = next(iter(state.values())).device if state else torch.device("cpu")
        packed = self._device_buckets(state, source if source.type == "cuda" else device)
        packed.pack(state)
        fp = packed.fingerprint(version)  # synchronises the device
        if not host or packed.device.type == "cpu":
            return packed, fp
        if self._host is None or self._host.layout.key != packed.layout.key:
            self._host = None
            self._host = WeightBuckets(packed.layout, "cpu", pin=True)
        self._host.copy_from(packed)
        packed.synchronize()
        return self._host, fp

    def _expect(self, version: int, meta: dict[str, Any]) -> None:
        if "fingerprint" in meta:
            self._expected = {version: (BucketLayout.from_json(meta["layout"]), meta["fingerprint"])}

    def verify(self, version: int, state: dict[str, Tensor]) -> None:
        """Check the loaded ``state`` (the live tensors) against the learner's fingerprint of ``version``."""
        if version not in self._expected:
            return
        layout, want = self._expected[version]
        got = fingerprint(state, layout, version)
        if got != want:
            raise WeightCheckError(f"weight version {version}: the loaded weights do not match what the learner "
                                   f"published (bit sums {got['sums']} != {want['sums']}); the copy was torn or "
                                   "corrupted")


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are one device when the current device is 0 (what every actor here runs on)."""
    def index(d: torch.device) -> int:
        return d.index if d.index is not None else (torch.cuda.current_device() if d.type == "cuda" else 0)

    return a.type == b.type and index(a) == index(b)


def _meta(version: int, buckets: WeightBuckets, fp: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"nbytes": buckets.nbytes(), "layout": buckets.layout.to_json(), "fingerprint": fp, **extra}


def _wait(store: Any, min_version: int, timeout_s: float) -> tuple[int, list[Any], dict[str, Any]]:
    try:
        return ray.get(store.wait_for.remote(min_version, timeout_s))
    except (TimeoutError, ray.exceptions.RayTaskError) as exc:
        raise StaleWeightsError(f"need weight version ≥ {min_version}: {exc}") from None


# ------------------------------------------------------------------------------------------ object store
class ObjectStoreSync(_Buckets):
    """Learner: the state cast and packed on its device, copied into a reused pinned host bucket, one ``ray.put``
    of the raw bytes per version. Worker: zero-copy views of the newest version's object."""

    backend = "object_store"

    def __init__(self, store: Any, dtype: torch.dtype | None = None) -> None:
        super().__init__(dtype)
        self.store = store

    def publish(self, version: int, state: dict[str, Tensor]) -> dict[str, float]:
        t0 = time.perf_counter()
        host, fp = self._stage(state, version, torch.device("cpu"), host=True)
        ref = ray.put({d: b.view(torch.uint8).numpy() for d, b in host.buffers.items()})
        ray.get(self.store.publish.remote(version, [ref], _meta(version, host, fp)))
        return {"bytes": float(host.nbytes()), "seconds": time.perf_counter() - t0}

    def fetch(self, min_version: int, current_version: int, timeout_s: float) -> tuple[int, dict[str, Tensor] | None]:
        """(version, state) of version ``min_version`` exactly; state None when ``current_version`` is it. A version
        whose object was lost with the learner that published it is waited for again: the restarted learner
        publishes it anew (``WeightStore.rewind``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            version, refs, meta = _wait(self.store, min_version, max(deadline - time.monotonic(), 0.001))
            if version == current_version:
                return version, None
            try:
                raw = ray.get(refs[0])
            except ray.exceptions.ObjectLostError:  # OwnerDiedError among them: the learner process is gone
                if time.monotonic() > deadline:
                    raise StaleWeightsError(f"weight version {min_version} was lost with the learner that published "
                                            "it and not published again in time") from None
                time.sleep(0.5)
                continue
            self._expect(version, meta)
            with warnings.catch_warnings():  # the object store's read-only pages: we only read them
                warnings.simplefilter("ignore", UserWarning)
                buffers = {d: torch.from_numpy(a).view(getattr(torch, d)) for d, a in raw.items()}
            return version, unpack(buffers, BucketLayout.from_json(meta["layout"]))


# -------------------------------------------------------------------------------------------- collective
class CollectiveSync(_Buckets):
    """Broadcast over a dedicated gloo/NCCL process group: rank 0 is the learner, rank i+1 rollout worker i.

    The group is created lazily on first use: the learner opens a TCPStore and posts its address in the
    ``WeightStore``; workers connect with their rank. ``device`` is where buffers live (cuda for NCCL); the
    learner broadcasts its reused cast buckets, each worker receives into its own reused buckets.
    """

    backend = "collective"

    def __init__(self, store: Any, rank: int, world_size: int, device: str = "cpu", timeout_s: float = 600.0,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(dtype)
        self.store, self.rank, self.world_size = store, rank, world_size
        self.device = torch.device(device)
        self.timeout = timedelta(seconds=timeout_s)
        self._pg: Any = None
        self._tcp: Any = None
        self._receive: WeightBuckets | None = None

    def _group(self) -> Any:
        if self._pg is not None:
            return self._pg
        import torch.distributed as dist

        if self.rank == 0:
            host = ray.util.get_node_ip_address()
            self._tcp = dist.TCPStore(host, 0, self.world_size, True, self.timeout, wait_for_workers=False)
            ray.get(self.store.set_rendezvous.remote({"host": host, "port": self._tcp.port}))
        else:
            info = ray.get(self.store.get_rendezvous.remote(self.timeout.total_seconds()))
            self._tcp = dist.TCPStore(info["host"], int(info["port"]), self.world_size, False, self.timeout)
        prefixed = dist.PrefixStore("euphonium-weights", self._tcp)
        if self.device.type == "cuda":
            self._refuse_shared_gpus(prefixed)
            self._pg = dist.ProcessGroupNCCL(prefixed, self.rank, self.world_size)
        else:
            self._pg = dist.ProcessGroupGloo(prefixed, self.rank, self.world_size, self.timeout)
        return self._pg

    def _refuse_shared_gpus(self, store: Any) -> None:
        """NCCL refuses a group in which two ranks sit on one GPU ("Duplicate GPU detected", seen on an H200 with
        NCCL 2.28): say so by role before NCCL does, since colocated fractional-GPU layouts end up there."""
        here = f"{ray.util.get_node_ip_address()}/{torch.cuda.get_device_properties(self.device).uuid}"
        store.set(f"gpu/{self.rank}", here)
        where = {r: store.get(f"gpu/{r}").decode() for r in range(self.world_size)}
        shared = ranks_sharing_a_device(where)
        if shared:
            names = "; ".join(" and ".join(_member_name(r) for r in group) for group in shared)
            raise RuntimeError(f"weight broadcast over NCCL needs one GPU per member, but {names} share a GPU "
                               "(a colocated, fractional-GPU layout); set cluster.weight_sync=cuda_ipc (every "
                               "rollout worker on the learner's GPU) or object_store")

    def _broadcast(self, buffers: dict[str, Tensor]) -> None:
        import torch.distributed as dist

        pg = self._group()
        for dtype in sorted(buffers):
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            pg.broadcast([buffers[dtype]], opts).wait()

    def open(self) -> None:
        """Join the group now (every member must, before the first broadcast completes)."""
        self._group()

    def publish(self, version: int, state: dict[str, Tensor]) -> dict[str, float]:
        t0 = time.perf_counter()
        packed, fp = self._stage(state, version, self.device, host=False)
        if not _same_device(packed.device, self.device):  # e.g. a CPU state for an NCCL group: one copy per dtype
            if self._receive is None or self._receive.layout.key != packed.layout.key:
                self._receive = None
                self._receive = WeightBuckets(packed.layout, self.device)
            self._receive.copy_from(packed)
            packed = self._receive
        ray.get(self.store.publish.remote(version, [], _meta(version, packed, fp)))
        self._broadcast(packed.buffers)
        return {"bytes": float(packed.nbytes()), "seconds": time.perf_counter() - t0}

    def fetch(self, min_version: int, current_version: int, timeout_s: float) -> tuple[int, dict[str, Tensor] | None]:
        version, _, meta = _wait(self.store, min_version, timeout_s)
        if version == current_version:
            return version, None
        layout = BucketLayout.from_json(meta["layout"])
        if self._receive is None or self._receive.layout.key != layout.key:
            self._receive = None
            self._receive = WeightBuckets(layout, self.device, pin=False)
        self._broadcast(self._receive.buffers)
        self._expect(version, meta)
        return version, self._receive.views


# ---------------------------------------------------------------------------------------------- CUDA IPC
class CudaIpcSync(_Buckets):
    """Learner and rollout workers on one GPU: the learner packs each version (cast on the device) into one of
    ``slots`` persistent device buckets and exports their CUDA IPC handles once; a worker maps them once and copies
    device to device into its policy. The ``WeightStore`` carries the version, the slot and the handles.

    Versions take the slots in turn, so a worker still copying version k is not overwritten before version
    k + ``slots`` is published; 2 slots cover the async mode's one step of staleness, 1 the sync mode. The
    cheap check after the copy (``verify``) would catch a torn copy all the same.

    Not tested on a GPU by the test suite (no CUDA there): it is a thin layer over ``WeightBuckets`` (tested) and
    ``publish.export_ipc`` / ``import_ipc``; ``bench/publish.py`` runs it on a GPU between two processes."""

    backend = "cuda_ipc"

    def __init__(self, store: Any, device: str = "cuda", dtype: torch.dtype | None = None, slots: int = 2) -> None:
        super().__init__(dtype)
        self.store, self.device, self.slots = store, torch.device(device), max(int(slots), 1)
        self._rings: list[WeightBuckets] = []
        self._exported: list[dict[str, Any]] = []
        self._export_id = ""
        self._mapped: dict[tuple[str, int], dict[str, Tensor]] = {}

    def publish(self, version: int, state: dict[str, Tensor]) -> dict[str, float]:
        t0 = time.perf_counter()
        if self.device.type != "cuda":
            raise RuntimeError("cluster.weight_sync=cuda_ipc needs the learner on a GPU")
        if not self._rings or not self._rings[0].layout.matches(state, self.dtype):
            self._rings, self._exported = [], []
            self._rings = [WeightBuckets.for_state(state, self.dtype, self.device) for _ in range(self.slots)]
            self._exported = [export_ipc(b.buffers) for b in self._rings]
            self._export_id = uuid.uuid4().hex
        slot = version % self.slots
        packed = self._rings[slot]
        packed.pack(state)
        fp = packed.fingerprint(version)  # synchronises: the bytes are in place before anyone hears of them
        ray.get(self.store.publish.remote(version, [], _meta(version, packed, fp, slot=slot, export=self._export_id,
                                                             ipc=self._exported[slot])))
        return {"bytes": float(packed.nbytes()), "seconds": time.perf_counter() - t0}

    def fetch(self, min_version: int, current_version: int, timeout_s: float) -> tuple[int, dict[str, Tensor] | None]:
        version, _, meta = _wait(self.store, min_version, timeout_s)
        if version == current_version:
            return version, None
        key = (str(meta["export"]), int(meta["slot"]))
        if key not in self._mapped:
            self._mapped = {k: v for k, v in self._mapped.items() if k[0] == key[0]}  # a new learner: drop the old
            self._mapped[key] = import_ipc(meta["ipc"])
        self._expect(version, meta)
        return version, unpack(self._mapped[key], BucketLayout.from_json(meta["layout"]))


def ranks_sharing_a_device(where: dict[int, str]) -> list[list[int]]:
    """Groups of ranks placed on the same device, each sorted; empty when every rank has its own."""
    by_device: dict[str, list[int]] = {}
    for rank in sorted(where):
        by_device.setdefault(where[rank], []).append(rank)
    return [ranks for ranks in by_device.values() if len(ranks) > 1]


def _member_name(rank: int) -> str:
    return "the learner" if rank == 0 else f"rollout worker {rank - 1}"


def make_weight_sync(backend: str, store: Any, *, rank: int = 0, world_size: int = 1, device: str = "cpu",
                     timeout_s: float = 600.0, dtype: torch.dtype | None = None, slots: int = 2) -> WeightSync:
    """The transport ``backend`` names (``ClusterConfig.weight_sync_backend``); ``dtype``: what floating tensors
    travel as (the rollout's weight dtype; None: as they are)."""
    if backend == "object_store":
        return ObjectStoreSync(store, dtype)
    if backend == "collective":
        return CollectiveSync(store, rank, world_size, device, timeout_s, dtype)
    if backend == "cuda_ipc":
        return CudaIpcSync(store, device, dtype, slots)
    raise ValueError(f"unknown weight sync backend {backend!r}; use 'object_store', 'collective' or 'cuda_ipc'")
