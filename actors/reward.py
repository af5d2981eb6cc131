"""Reward pools: latent PRM scorers and pixel ORM scorers, and a client that balances requests across them.

``PRMScorer`` scores latents (and gives ∇ for RGG when the PRM lives in the pool, ``prm.placement: pool``).
``ORMScorer`` decodes latents with the model's codec and scores the videos with the configured backend
(``rewards.orm.backend``; the toy judge here, real judges register through ``actors.common``). A video the
scorer cannot judge (non-finite pixels, a scorer exception) gets a NaN score and a log line: the driver then
skips its group instead of losing the step.

``ScorerPool`` is a plain object holding actor handles; it can be shipped to other actors (a rollout worker
calling the PRM pool). It sends each request to the least-loaded actor (ties round-robin) and splits a batch
into chunks across actors. Actors restart on failure (``max_restarts``) and Ray retries their in-flight calls
(``max_task_retries``); ``ScorerPool.run`` retries once more itself when a call still fails with a dead actor.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
import torch
from torch import Tensor

from euphonium_ray.actors.common import actor_device, config_from, memory_report, release_cached_memory, set_threads
from euphonium_ray.roles import build_orm, load_codec_for, load_prm
from euphonium_ray.models.base import TextConditioning
from euphonium_ray.reward_failures import FailureNotes, score_isolating_failures
from euphonium_ray.wire import pack, unpack

__all__ = ["ORMScorer", "PRMScorer", "ScorerPool"]

log = logging.getLogger("euphonium_ray.reward")

RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


@ray.remote
class PRMScorer:
    """A latent PRM copy: ``score`` and ``score_and_grad`` on batches of latents."""

    def __init__(self, cfg: dict[str, Any], gpus: float = 0.0, cpus: float = 1.0) -> None:
        t0 = time.perf_counter()
        set_threads(cpus)
        self.cfg = config_from(cfg)
        self.gpus = gpus
        self.device = actor_device(gpus)
        self.prm = load_prm(self.cfg, self.device)
        self.load_seconds = time.perf_counter() - t0

    def ready(self) -> dict[str, Any]:
        import os

        return {"pid": os.getpid(), "device": str(self.device), "gpu_ids": ray.get_gpu_ids()}

    def memory(self) -> dict[str, float]:
        """Peak CUDA memory of this actor (bytes) and its model-loading seconds."""
        return {**memory_report(self.device), "load_seconds": self.load_seconds}

    def score(self, latents: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        latents, sigma, cond = unpack((latents, sigma, cond), self.device)  # tensors or ``wire.pack``ed
        c = TextConditioning.from_dict(cond).to(self.device)
        out = self.prm.score(latents.to(self.device), sigma.to(self.device), c).float().cpu()
        release_cached_memory(self.device, self.gpus)
        return out

    def score_clean(self, latents: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The latent outcome reward: the PRM on clean latents (x̂0) at σ = 0."""
        latents = unpack(latents, self.device)
        return self.score(latents, torch.zeros(latents.shape[0]), cond)

    def score_and_grad(self, latents: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        latents, sigma, cond = unpack((latents, sigma, cond), self.device)
        c = TextConditioning.from_dict(cond).to(self.device)
        score, grad = self.prm.score_and_grad(latents.to(self.device), sigma.to(self.device), c)
        out = pack((score.float(), grad.float()))  # ``wire``: the gradient is latent-sized
        release_cached_memory(self.device, self.gpus)
        return out


@ray.remote
class ORMScorer:
    """Decode latents and score the videos against their captions; NaN for a video that cannot be judged."""

    def __init__(self, cfg: dict[str, Any], gpus: float = 0.0, cpus: float = 1.0) -> None:
        t0 = time.perf_counter()
        set_threads(cpus)
        self.cfg = config_from(cfg)
        self.gpus = gpus
        self.device = actor_device(gpus)
        self.codec = load_codec_for(self.cfg, self.device)
        self.orm = build_orm(self.cfg, self.device)
        self.failures = 0
        self.scorer_failures = FailureNotes("ORM scorer", log)
        self.load_seconds = time.perf_counter() - t0

    def ready(self) -> dict[str, Any]:
        import os

        return {"pid": os.getpid(), "device": str(self.device), "gpu_ids": ray.get_gpu_ids()}

    def memory(self) -> dict[str, float]:
        """Peak CUDA memory of this actor (bytes: codec decode and ORM) and its model-loading seconds."""
        return {**memory_report(self.device), "load_seconds": self.load_seconds}

    def decode(self, latents: Tensor) -> Tensor:
        """Pixels (on the CPU) of each latent."""
        return self._decode(unpack(latents, self.device)).cpu()

    def _decode(self, latents: Tensor) -> Tensor:
        """Pixels on this actor's device, ``rewards.orm.decode_batch`` videos per codec call (1: a full-size VAE's
        decode activations grow with the batch, a group of 8 at 480x480x29 would hold eight times one video's;
        0: the whole request in one call, for a small codec whose per-call cost dominates). Videos do not
        interact in a decode."""
        n = latents.shape[0]
        size = self.cfg.rewards.orm.decode_batch or max(n, 1)
        with torch.no_grad():
            return torch.cat([self.codec.decode(latents[i:i + size].to(self.device)).float()
                              for i in range(0, n, size)]) if n else torch.zeros(0, device=self.device)

    def score_videos(self, videos: Tensor, captions: list[str]) -> Tensor:
        finite = torch.isfinite(videos.flatten(1)).all(dim=1).cpu()
        scores = torch.full((videos.shape[0],), float("nan"))
        rows = finite.nonzero().flatten()
        for bad in (~finite).nonzero().flatten().tolist():
            self.failures += 1
            log.warning("ORM: video %d (%r) has non-finite pixels; its reward is NaN", bad, captions[bad])
        if rows.numel():  # a scorer exception costs the video it failed on, not the batch
            scores[rows] = score_isolating_failures(self.orm.score, videos[rows.to(videos.device)].to(self.device),
                                                    [captions[i] for i in rows.tolist()], self.scorer_failures)
        return scores

    def take_failure_notes(self) -> list[str]:
        """The scorer failures since the last call, one line each (the driver logs them)."""
        return self.scorer_failures.take()

    def score_latents(self, latents: Tensor, captions: list[str]) -> Tensor:
        """Decode then score; latents (B, C, T, h, w) in the DiT's latent space."""
        scores = self.score_videos(self._decode(unpack(latents, self.device)), captions)
        release_cached_memory(self.device, self.gpus)
        return scores

    def failure_count(self) -> int:
        return self.failures + self.scorer_failures.count

    def close(self) -> None:
        """Release what the scorer started outside this process (the vLLM judge's server): a killed actor could
        not, and the server would outlive the run."""
        close = getattr(self.orm, "close", None)
        if callable(close):
            close()


def _rows(value: Any, start: int, stop: int) -> Any:
    if isinstance(value, dict):
        return {k: v[start:stop] for k, v in value.items()}
    return value[start:stop]


class ScorerPool:
    """Least-loaded dispatch over same-kind scorer actors; batch splitting; one extra retry on actor death."""

    def __init__(self, actors: list[Any], retries: int = 2) -> None:
        if not actors:
            raise ValueError("a scorer pool needs at least one actor")
        self.actors = list(actors)
        self.retries = retries
        self._inflight = [0] * len(self.actors)
        self._next = 0

    def __len__(self) -> int:
        return len(self.actors)

    def __getstate__(self) -> dict[str, Any]:
        return {"actors": self.actors, "retries": self.retries}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["actors"], state["retries"])

    def _pick(self) -> int:
        n = len(self.actors)
        order = [(self._next + i) % n for i in range(n)]
        best = min(order, key=lambda i: self._inflight[i])
        self._next = (best + 1) % n
        return best

    def run(self, method: str, *args: Any) -> Any:
        """Call ``method`` on the least-loaded actor and wait; a dead actor's call is retried (on its restart)."""
        for attempt in range(self.retries + 1):
            i = self._pick()
            self._inflight[i] += 1
            try:
                return ray.get(getattr(self.actors[i], method).remote(*pack(args)))
            except RETRYABLE:
                if attempt == self.retries:
                    raise
                time.sleep(0.5)
            finally:
                self._inflight[i] -= 1
        raise AssertionError("unreachable")

    def gather(self, method: str) -> list[Any]:
        """Call ``method`` (no arguments, returning a list) on every actor; their lists joined in actor order."""
        return [item for part in ray.get([getattr(a, method).remote() for a in self.actors]) for item in part]

    def map_rows(self, method: str, *row_args: Any, chunk: int | None = None) -> Tensor:
        """Split per-row arguments (tensors, lists, or dicts of tensors, all B rows) into chunks over the
        actors, run them in parallel, concatenate the results in order. A chunk whose actor died is re-run
        through ``run`` (which waits for the restart)."""
        n = len(row_args[0]) if not isinstance(row_args[0], dict) else len(next(iter(row_args[0].values())))
        size = chunk or max(1, -(-n // len(self.actors)))
        calls = []
        for s in range(0, n, size):
            args = pack(tuple(_rows(a, s, s + size) for a in row_args))  # numpy payloads: no torch pickling
            i = self._pick()
            self._inflight[i] += 1
            calls.append((i, getattr(self.actors[i], method).remote(*args), args))
        out = []
        try:
            for _, ref, args in calls:
                try:
                    out.append(ray.get(ref))
                except RETRYABLE:
                    out.append(self.run(method, *args))
        finally:
            for i, _, _ in calls:
                self._inflight[i] -= 1
        return torch.cat(out) if out else torch.zeros(0)

    def prm_callable(self):
        """An RGG ``score_and_grad(latents, sigma, cond)`` that runs in this pool."""

        def score_and_grad(latents: Tensor, sigma: Tensor, cond: TextConditioning) -> tuple[Tensor, Tensor]:
            device = latents.device
            score, grad = unpack(self.run("score_and_grad", latents.detach(), sigma.detach(), cond.as_dict()), device)
            return score.to(device), grad.to(device)

        return score_and_grad
