"""What every actor does when it starts and after its phases: its device and thread count, its run config, what
memory it holds and gives back. What it loads is ``euphonium_ray.roles``'s business."""

from __future__ import annotations

import os
from typing import Any

import torch

from euphonium_ray.config import RunConfig

__all__ = ["actor_device", "config_from", "memory_report", "release_cached_memory", "set_threads"]


def set_threads(num_cpus: float) -> None:
    """Keep torch's intra-op pool to the CPUs Ray gave this actor (oversubscribing 2 cores halves throughput)."""
    n = max(1, int(num_cpus))
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def actor_device(gpus: float) -> torch.device:
    """cuda when Ray gave this actor a GPU share and torch sees one, else cpu."""
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def memory_report(device: torch.device) -> dict[str, float]:
    """What this process holds, in bytes: CUDA peak allocated and reserved (``torch.cuda.max_memory_*`` since the
    process started), allocated now, and the resident set."""
    from euphonium_ray.metrics import rss_bytes

    cuda = device.type == "cuda"
    return {"pid": float(os.getpid()), "rss_bytes": float(rss_bytes()),
            "gpu_max_allocated_bytes": float(torch.cuda.max_memory_allocated(device)) if cuda else 0.0,
            "gpu_max_reserved_bytes": float(torch.cuda.max_memory_reserved(device)) if cuda else 0.0,
            "gpu_allocated_bytes": float(torch.cuda.memory_allocated(device)) if cuda else 0.0}


CACHE_KEPT_BYTES = 1 << 30  # below this much cached-but-free memory, keep it (re-allocating costs time)
FREE_FRACTION_KEPT = 0.25  # while the device has this fraction free, no role is short of memory: keep the cache


def release_cached_memory(device: torch.device, gpus: float) -> None:
    """Give cached CUDA blocks back when this process shares its GPU with other roles (a fractional share), holds
    more than ``CACHE_KEPT_BYTES`` of them unused, and the device is short of free memory (under
    ``FREE_FRACTION_KEPT`` of it): what one role's allocator keeps after its phase is memory another role's phase
    may need (a full-size rollout leaves GiBs of activations cached). With room to spare (the toy world on an
    H200) the cache stays: emptying it made every phase allocate its activations afresh, each step."""
    if device.type == "cuda" and 0 < gpus < 1:
        if torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device) > CACHE_KEPT_BYTES:
            free, total = torch.cuda.mem_get_info(device)
            if free < FREE_FRACTION_KEPT * total:
                torch.cuda.empty_cache()


def config_from(payload: dict[str, Any] | RunConfig) -> RunConfig:
    """The run config an actor was given; the run's plugins are imported first, so their components resolve."""
    if isinstance(payload, RunConfig):
        return payload
    from euphonium_ray.registry import load_plugins

    load_plugins(payload.get("plugins") or [])
    return RunConfig.model_validate(payload)
