"""Versioned weight broadcast from the learner to the rollout workers.

The version is the number of optimizer passes applied (the training step): the learner publishes version k after
learning step k−1, and a rollout worker asked for ``min_version`` waits for it and refuses to sample with an
older one (``StaleWeightsError``). What moves is ``policy.sync_state_dict()``: every tensor, or only the LoRA
tensors when the learner trains LoRA.

Two transports behind one interface (``publish`` on the learner, ``fetch`` on a rollout worker):

* ``ObjectStoreSync``: the learner ``ray.put``s the CPU state once; every worker reads it from the object store
  (shared memory on one node, object transfer across nodes). The small ``WeightStore`` actor only holds the
  version number and the reference.
* ``CollectiveSync``: a torch process group of its own (gloo on CPU, NCCL on GPU; not the learner's data-parallel
  group) between the learner's rank 0 and the rollout workers; the tensors are flattened per dtype and broadcast
  from rank 0, so GPU weights go GPU to GPU. The ``WeightStore`` still carries the version and tensor layout, and
  is the rendezvous point. Every receiver must join every broadcast, in order.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any, Protocol

import ray
import torch
from torch import Tensor

from euphonium_ray.checkpoint import state_nbytes
from euphonium_ray.errors import EuphoniumError
from euphonium_ray.wire import pack, unpack

__all__ = [
    "CollectiveSync",
    "ObjectStoreSync",
    "StaleWeightsError",
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


# ------------------------------------------------------------------------------------------ object store
class ObjectStoreSync:
    """Learner: one ``ray.put`` per version. Worker: read the newest version's object. The tensors travel as numpy
    payloads (``wire``): copied once into shared memory, and read from there straight onto the worker's device."""

    backend = "object_store"

    def __init__(self, store: Any, device: str | None = None) -> None:
        self.store = store
        self.device = device

    def publish(self, version: int, state: dict[str, Tensor]) -> dict[str, float]:
        t0 = time.perf_counter()
        ref = ray.put(pack(state))  # one device-to-host copy per tensor, then one copy into the object store
        ray.get(self.store.publish.remote(version, [ref], {"nbytes": state_nbytes(state)}))
        return {"bytes": float(state_nbytes(state)), "seconds": time.perf_counter() - t0}

    def fetch(self, min_version: int, current_version: int, timeout_s: float) -> tuple[int, dict[str, Tensor] | None]:
        """(version, state) of version ``min_version`` exactly; state None when ``current_version`` is it. A version
        whose object was lost with the learner that published it is waited for again: the restarted learner
        publishes it anew (``WeightStore.rewind``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                version, refs, _ = ray.get(self.store.wait_for.remote(min_version, max(deadline - time.monotonic(),
                                                                                       0.001)))
            except (TimeoutError, ray.exceptions.RayTaskError) as exc:
                raise StaleWeightsError(f"need weight version ≥ {min_version}: {exc}") from None
            if version == current_version:
                return version, None
            try:
                return version, unpack(ray.get(refs[0]), self.device)
            except ray.exceptions.ObjectLostError:  # OwnerDiedError among them: the learner process is gone
                if time.monotonic() > deadline:
                    raise StaleWeightsError(f"weight version {min_version} was lost with the learner that published "
                                            "it and not published again in time") from None
                time.sleep(0.5)


# -------------------------------------------------------------------------------------------- collective
def _flatten(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[tuple[str, str, list[int]]]]:
    """One contiguous buffer per dtype, and the (name, dtype, shape) layout to undo it (sorted by name)."""
    layout = [(n, str(state[n].dtype).removeprefix("torch."), list(state[n].shape)) for n in sorted(state)]
    buffers: dict[str, list[Tensor]] = {}
    for name, dtype, _ in layout:
        buffers.setdefault(dtype, []).append(state[name].detach().reshape(-1))
    return {d: torch.cat(parts) for d, parts in buffers.items()}, layout


def _unflatten(buffers: dict[str, Tensor], layout: list[tuple[str, str, list[int]]]) -> dict[str, Tensor]:
    offsets = {d: 0 for d in buffers}
    out: dict[str, Tensor] = {}
    for name, dtype, shape in layout:
        n = int(torch.Size(shape).numel())
        out[name] = buffers[dtype][offsets[dtype] : offsets[dtype] + n].view(shape)
        offsets[dtype] += n
    return out


class CollectiveSync:
    """Broadcast over a dedicated gloo/NCCL process group: rank 0 is the learner, rank i+1 rollout worker i.

    The group is created lazily on first use: the learner opens a TCPStore and posts its address in the
    ``WeightStore``; workers connect with their rank. ``device`` is where buffers live (cuda for NCCL).
    """

    backend = "collective"

    def __init__(self, store: Any, rank: int, world_size: int, device: str = "cpu", timeout_s: float = 600.0) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.device = torch.device(device)
        self.timeout = timedelta(seconds=timeout_s)
        self._pg: Any = None
        self._tcp: Any = None

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
                               "(a colocated, fractional-GPU layout); set cluster.weight_sync=object_store")

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
        buffers, layout = _flatten({k: v.to(self.device) for k, v in state.items()})
        ray.get(self.store.publish.remote(version, [], {"layout": layout, "nbytes": state_nbytes(state)}))
        self._broadcast(buffers)
        return {"bytes": float(state_nbytes(state)), "seconds": time.perf_counter() - t0}

    def fetch(self, min_version: int, current_version: int, timeout_s: float) -> tuple[int, dict[str, Tensor] | None]:
        try:
            version, _, meta = ray.get(self.store.wait_for.remote(min_version, timeout_s))
        except (TimeoutError, ray.exceptions.RayTaskError) as exc:
            raise StaleWeightsError(f"need weight version ≥ {min_version}: {exc}") from None
        if version == current_version:
            return version, None
        layout = [(n, d, list(s)) for n, d, s in meta["layout"]]
        sizes: dict[str, int] = {}
        for _, dtype, shape in layout:
            sizes[dtype] = sizes.get(dtype, 0) + int(torch.Size(shape).numel())
        buffers = {d: torch.empty(n, dtype=getattr(torch, d), device=self.device) for d, n in sizes.items()}
        self._broadcast(buffers)
        return version, _unflatten(buffers, layout)


def ranks_sharing_a_device(where: dict[int, str]) -> list[list[int]]:
    """Groups of ranks placed on the same device, each sorted; empty when every rank has its own."""
    by_device: dict[str, list[int]] = {}
    for rank in sorted(where):
        by_device.setdefault(where[rank], []).append(rank)
    return [ranks for ranks in by_device.values() if len(ranks) > 1]


def _member_name(rank: int) -> str:
    return "the learner" if rank == 0 else f"rollout worker {rank - 1}"


def make_weight_sync(backend: str, store: Any, *, rank: int = 0, world_size: int = 1, device: str = "cpu",
                     timeout_s: float = 600.0) -> WeightSync:
    if backend == "object_store":
        return ObjectStoreSync(store, device)
    if backend == "collective":
        return CollectiveSync(store, rank, world_size, device, timeout_s)
    raise ValueError(f"unknown weight sync backend {backend!r}; use 'object_store' or 'collective'")
