"""Prompt encoding spread over Ray actors (``euphonium-ray preprocess --ray-workers N``): each actor holds its own
text encoders (``preprocess.PromptEncoderWorker``); ``ray.util.ActorPool`` keeps every actor busy with one batch at
a time and hands results back as they finish."""

from __future__ import annotations

from typing import Any, Callable

import ray
from ray.util import ActorPool

from euphonium_ray.preprocess import PromptEncoderWorker

__all__ = ["encode_on_ray"]


def encode_on_ray(batches: list[list[int]], prompts: list[str], args: tuple, workers: int,
                  ray_init: dict[str, Any] | None, on_done: Callable[[tuple], Any]) -> None:
    """Encode ``batches`` (prompt indices) on ``workers`` actors built from ``args``; ``on_done`` gets each result
    in the order they finish. Starts (and then stops) a local Ray unless one is running."""
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(**(ray_init or {}))
    try:
        actor_cls = ray.remote(num_cpus=1)(PromptEncoderWorker)
        actors = [actor_cls.remote(*args) for _ in range(min(workers, len(batches)))]
        pool = ActorPool(actors)
        for result in pool.map_unordered(lambda a, batch: a.encode.remote(batch, [prompts[i] for i in batch]),
                                         batches):
            on_done(result)
        for actor in actors:
            ray.kill(actor)
    finally:
        if started_here:
            ray.shutdown()
