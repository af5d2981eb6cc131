"""The rollout worker: a frozen policy copy that samples guided SDE trajectories for groups of prompts.

Thin by design: it holds the policy (bf16 on GPU, fp32 on CPU), a PRM copy when ``prm.placement: colocated``
(else it calls the PRM pool), and calls ``sampling.sample_trajectories`` on the whole batch of groups at once.
Before sampling it loads the exact weight version the driver asks for and refuses a version older than the
mode allows (``StaleWeightsError``: 0 steps behind in ``sync``, 1 in ``async``).
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray
import torch

from euphonium_ray.actors.common import actor_device, config_from, memory_report, release_cached_memory, set_threads
from euphonium_ray.actors.weights import StaleWeightsError, make_weight_sync
from euphonium_ray.checkpoint import state_digest
from euphonium_ray.learning import unused_by_learner
from euphonium_ray.metrics import rss_bytes
from euphonium_ray.models.base import TextConditioning
from euphonium_ray.roles import load_codec_for, load_policy, load_prm, rollout_weight_dtype
from euphonium_ray.sampling import make_generators, sample_latents
from euphonium_ray.step import rollout
from euphonium_ray.wire import pack, unpack

__all__ = ["RolloutWorker", "max_staleness"]


def max_staleness(mode: str) -> int:
    """How many learner steps the weights a rollout uses may lag: 0 on-policy (sync), 1 in async."""
    return 0 if mode == "sync" else 1


@ray.remote
class RolloutWorker:
    """Samples trajectories for the driver; ``index`` is its rank among rollout workers (collective rank index+1)."""

    def __init__(self, cfg: dict[str, Any], index: int, weight_store: Any, *, prm_pool: Any = None,
                 orm_pool: Any = None, sync_backend: str = "object_store", num_workers: int = 1,
                 gpus: float = 0.0, cpus: float = 1.0) -> None:
        t0 = time.perf_counter()
        set_threads(cpus)
        self.cfg = config_from(cfg)
        self.index = index
        self.gpus = gpus
        self.device = actor_device(gpus)
        self.policy = load_policy(self.cfg, "rollout", self.device)
        self.prm = None
        if self.cfg.rgg.enabled and self.cfg.rewards.prm.placement == "colocated":
            codec = load_codec_for(self.cfg, self.device) if self.cfg.rewards.prm.kind == "oracle" else None
            self.prm = load_prm(self.cfg, self.device, policy=self.policy, codec=codec)
        self.prm_pool = prm_pool
        self.orm_pool = orm_pool
        self.sync = make_weight_sync(sync_backend, weight_store, rank=index + 1, world_size=num_workers + 1,
                                     device=str(self.device), timeout_s=self.cfg.cluster.timeouts.weights_s,
                                     dtype=rollout_weight_dtype(self.cfg))
        self.version = -1
        self.sampled = 0
        self.metrics = None
        self.load_seconds = time.perf_counter() - t0

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "device": str(self.device), "version": self.version, "index": self.index,
                "gpu_ids": ray.get_gpu_ids()}

    def memory(self) -> dict[str, float]:
        """Peak CUDA memory of this actor (bytes: policy copy, sampling, a colocated PRM) and its loading seconds."""
        return {**memory_report(self.device), "load_seconds": self.load_seconds}

    # ----------------------------------------------------------------------------------------- weights
    def load_weights(self, version: int, timeout_s: float | None = None) -> dict[str, float]:
        """Make the policy exactly ``version`` (waiting up to ``cluster.timeouts.weights_s`` for the learner to
        publish it)."""
        t0 = time.perf_counter()
        timeout_s = self.cfg.cluster.timeouts.weights_s if timeout_s is None else timeout_s
        if version == self.version:
            return {"version": float(self.version), "seconds": 0.0}
        got, state = self.sync.fetch(version, self.version, timeout_s)
        if got != version:
            raise StaleWeightsError(f"rollout worker {self.index}: asked for weight version {version}, got {got}")
        if state is not None:
            self.policy.load_sync_state_dict(state)
            self._check(got)
        self.version = got
        self._metric("euphonium_weight_version", float(got))
        return {"version": float(self.version), "seconds": time.perf_counter() - t0}

    def _check(self, version: int) -> None:
        """The loaded weights against what the learner published: its cheap fingerprint (one read on the device),
        or under ``cluster.weight_check: digest`` nothing here (the driver's tests compare ``param_digest``)."""
        if self.cfg.cluster.weight_check == "fingerprint":
            self.sync.verify(version, self.policy.sync_state_dict())

    def _metric(self, name: str, value: float) -> None:
        if self.metrics is None:
            from euphonium_ray.metrics import RayMetrics

            self.metrics = RayMetrics("rollout")
        self.metrics.record(name, value)

    def weight_version(self) -> int:
        return self.version

    def param_digest(self) -> tuple[int, str]:
        """(version, full SHA-256 of the broadcast tensors): a test and debug call, never on the hot path; equal to
        the learner's digest under ``cluster.weight_check: digest`` means bit-identical weights."""
        return self.version, state_digest(self.policy.sync_state_dict())

    # ---------------------------------------------------------------------------------------- sampling
    def _prm(self):
        if not self.cfg.rgg.enabled:
            return None
        if self.prm is not None:
            return self.prm
        if self.prm_pool is None:
            raise ValueError("rgg.enabled with prm.placement=pool but no PRM pool was given to the rollout worker")
        return self.prm_pool.prm_callable()

    def _spsa_score_fn(self, captions: list[str]):
        if not self.cfg.spsa.enabled:
            return None
        if self.orm_pool is None:
            raise ValueError("spsa.enabled but no ORM pool was given to the rollout worker")

        def score(points: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            caps = [captions[int(r)] for r in rows]
            return self.orm_pool.map_rows("score_latents", points.detach(), caps).to(points.device)

        return score

    def sample(self, request: dict[str, Any]) -> dict[str, Any]:
        """Sample the request's groups. Request: ``step``, ``version``, ``cond`` (dict, B rows, groups contiguous,
        tensors or ``wire.pack``ed), ``captions``, ``prompt_indices``, ``seeds`` (B,), ``latent_shape``. The
        trajectory comes back ``wire.pack``ed."""
        step, version = int(request["step"]), int(request["version"])
        allowed = step - max_staleness(self.cfg.cluster.mode)
        if version < allowed:
            raise StaleWeightsError(
                f"rollout worker {self.index}: step {step} in {self.cfg.cluster.mode} mode needs weight version "
                f"≥ {allowed}, was asked to sample with {version}"
            )
        sync = self.load_weights(version)
        timings: dict[str, float] = {"weights": sync["seconds"]}
        t0 = time.perf_counter()
        cond = TextConditioning.from_dict(unpack(request["cond"], self.device)).to(self.device)
        captions = list(request["captions"])
        traj = rollout(self.policy, cond, self.cfg, prm=self._prm(), latent_shape=request["latent_shape"],
                       seeds=request["seeds"], prompt_indices=request["prompt_indices"], captions=captions,
                       spsa_score_fn=self._spsa_score_fn(captions), weight_version=self.version, timings=timings)
        timings["sample"] = time.perf_counter() - t0
        self.sampled += traj.batch_size
        self._metric("euphonium_videos_total", float(traj.batch_size))
        self._metric("euphonium_rss_bytes", float(rss_bytes()))
        gpu = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        self._metric("euphonium_gpu_memory_bytes", float(gpu))
        traj = traj.without(*unused_by_learner(self.cfg))  # what the learner never reads does not travel
        t1 = time.perf_counter()
        packed = pack(traj.to_dict())  # numpy payloads: the object store holds them without torch's pickling
        timings["pack"] = time.perf_counter() - t1
        out = {"traj": packed, "timings": timings, "worker": self.index, "pid": os.getpid()}
        del traj
        release_cached_memory(self.device, self.gpus)
        return out

    def evaluate(self, request: dict[str, Any]) -> Any:
        """Plain ODE samples (what inference uses, no PRM) with weight ``version``: final latents (B, ...), packed
        for the object store (``wire.unpack``)."""
        self.load_weights(int(request["version"]))
        cond = TextConditioning.from_dict(unpack(request["cond"], self.device)).to(self.device)
        x = sample_latents(self.policy, cond, latent_shape=request["latent_shape"],
                           num_steps=self.cfg.sampler.num_steps, shift=self.cfg.sampler.shift, noise_type="ode",
                           generator=make_generators(request["seeds"]))
        out = pack(x)
        release_cached_memory(self.device, self.gpus)
        return out
