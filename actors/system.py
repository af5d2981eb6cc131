"""The running system as the driver sees it: one method per phase of a training step, each a little Ray glue.

``TrainingSystem`` owns the weight store, the role actors and the learner. Its phases are ``rollout`` (groups
split over the rollout workers, each running ``step.rollout``), ``score`` (ORM pool, and the PRM pool for the
latent outcome reward: ``step.score``), ``learn``/``learned`` (``step.split_for_learners`` shards to the Ray Train
learner, then its answer), ``broadcast`` (sync mode: every rollout worker loads the new version) and ``evaluate``
(plain ODE samples scored by the ORM). Each phase times itself into the step's ``timings``. A call to a rollout worker that dies mid-step is retried on the
restarted actor (Ray restarts it, ``max_restarts``) with the same request, whose per-sample seeds make the
retried samples identical.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
import torch
from torch import Tensor

from euphonium_ray.actors.learner import start_learner
from euphonium_ray.actors.placement import RoleActors, start_roles
from euphonium_ray.actors.reward import RETRYABLE, ScorerPool
from euphonium_ray.actors.weights import WeightStore
from euphonium_ray.config import RunConfig
from euphonium_ray.errors import RunError
from euphonium_ray.models.base import TextConditioning
from euphonium_ray.sampling import sample_seed, seeds_for
from euphonium_ray.step import LearnBatch, Rewards, score, split_for_learners
from euphonium_ray.trajectory import Trajectories, group_rows
from euphonium_ray.wire import pack, unpack

__all__ = ["StepBatch", "TrainingSystem"]


@dataclass
class StepBatch:
    """A step's rollouts (sampled with weight ``version``), their outcome rewards once scored, and the seconds of
    its phases."""

    step: int
    version: int
    traj: Trajectories
    rewards: Rewards | None = None
    timings: dict[str, float] = field(default_factory=dict)
    sources: list[Any] = field(default_factory=list)  # the rollout workers' results (ObjectRefs), in ``traj`` order

    @property
    def orm(self) -> Tensor:
        assert self.rewards is not None, "the batch is not scored yet"
        return self.rewards.orm

    @property
    def latent(self) -> Tensor | None:
        return self.rewards.latent if self.rewards is not None else None


class TrainingSystem:
    """Start with ``TrainingSystem(cfg, dataset, latent_shape, ...)``; stop with ``close()``."""

    def __init__(self, cfg: RunConfig, conditioning: Callable[[list[int]], tuple[TextConditioning, list[str]]],
                 num_prompts: int, latent_shape: tuple[int, ...], *, resume: str | None, sync_backend: str,
                 log: Callable[[str], None] = print) -> None:
        self.cfg, self.conditioning, self.num_prompts = cfg, conditioning, num_prompts
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.log = log
        self.retries = cfg.cluster.max_task_retries
        self.store = WeightStore.remote()
        self.roles: RoleActors | None = None
        self.learner = None
        self._learn_started: dict[int, float] = {}
        self.timings: dict[str, float] = {}  # the driver thread's phases of the current step (learn, broadcast)
        try:
            # the learner (Ray Train start-up) and the role actors (model loading) start concurrently
            self.learner = start_learner(cfg, store=self.store, resume=resume, sync_backend=sync_backend,
                                         storage_path=str(cfg.output.dir) + "/ray_train", run_name="learner")
            self.roles = start_roles(cfg, self.store, sync_backend=sync_backend)
            self.orm_pool = ScorerPool(self.roles.orm, self.retries)
            self.prm_pool = ScorerPool(self.roles.prm, self.retries) if self.roles.prm else None
            self.ready = self.learner.wait_ready(cfg.cluster.timeouts.start_s)
        except BaseException:
            self.close()
            raise

    @property
    def rollout_workers(self) -> list[Any]:
        assert self.roles is not None
        return self.roles.rollout

    # ------------------------------------------------------------------------------------- fault tolerance
    def _call(self, worker_index: int, method: str, *args: Any) -> Any:
        """Call a rollout worker and wait; if the actor died mid-call, wait for its restart and call again."""
        return self._call_ref(worker_index, method, *args)[1]

    def _call_ref(self, worker_index: int, method: str, *args: Any) -> tuple[Any, Any]:
        """``_call``, and the ObjectRef of the answer it returns."""
        for attempt in range(self.retries + 1):
            worker = self.rollout_workers[worker_index]
            try:
                ref = getattr(worker, method).remote(*args)
                return ref, ray.get(ref)
            except RETRYABLE as exc:
                if attempt == self.retries:
                    raise
                self.log(f"rollout worker {worker_index} failed during {method} ({type(exc).__name__}); retrying")
                time.sleep(1.0)
        raise AssertionError("unreachable")

    def _gather(self, method: str, requests: list[dict[str, Any]]) -> list[Any]:
        """Send one request per worker in parallel; retry any whose actor died."""
        return [value for _, value in self._gather_refs(method, requests)]

    def _gather_refs(self, method: str, requests: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
        """``_gather``, each answer with its ObjectRef (the driver owns it: it outlives the worker)."""
        refs = [getattr(self.rollout_workers[i], method).remote(r) for i, r in enumerate(requests)]
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append((ref, ray.get(ref)))
            except RETRYABLE as exc:
                self.log(f"rollout worker {i} failed during {method} ({type(exc).__name__}); retrying on its restart")
                out.append(self._call_ref(i, method, requests[i]))
        return out

    # ---------------------------------------------------------------------------------------------- phases
    def _requests(self, step: int, version: int, prompts: list[int]) -> list[dict[str, Any]]:
        g = self.cfg.sampler.group_size
        cond, captions = self.conditioning(prompts)
        cond = cond.repeat_interleave(g)
        captions = [c for c in captions for _ in range(g)]
        prompt_rows = [p for p in prompts for _ in range(g)]
        seeds = seeds_for(self.cfg.seed, step, prompts, g, self.num_prompts)
        chunks = torch.arange(len(prompts)).tensor_split(min(len(self.rollout_workers), len(prompts)))
        requests = []
        for groups in chunks:
            rows = group_rows(groups, g)
            idx = rows.tolist()
            requests.append({
                "step": step, "version": version, "cond": pack(cond.index(rows).as_dict()),
                "captions": [captions[i] for i in idx], "prompt_indices": [prompt_rows[i] for i in idx],
                "seeds": [seeds[i] for i in idx], "latent_shape": self.latent_shape,
            })
        return requests

    def rollout(self, step: int, version: int, prompts: list[int]) -> StepBatch:
        """``prompts``' groups sampled with weight ``version``; the workers' phase seconds are the slowest one's
        (they run in parallel: the slowest is the critical path)."""
        t0 = time.perf_counter()
        answers = self._gather_refs("sample", self._requests(step, version, prompts))
        results = [value for _, value in answers]
        t1 = time.perf_counter()
        # read-only views of the object store's copy: the driver only reads a rollout (selects and cats copy)
        traj = Trajectories.cat([Trajectories.from_dict(unpack(r["traj"], writable=False)) for r in results])
        timings: dict[str, float] = {}
        for r in results:
            for k, v in r["timings"].items():
                timings[k] = max(timings.get(k, 0.0), v)
        timings["unpack"] = time.perf_counter() - t1
        timings["rollout"] = time.perf_counter() - t0
        return StepBatch(step, version, traj, timings=timings, sources=[ref for ref, _ in answers])

    def score(self, batch: StepBatch) -> StepBatch:
        """The batch with its outcome rewards (``step.score`` through the scorer pools); NaN where a scorer could
        not judge."""
        t0 = time.perf_counter()
        prm_pool = self.prm_pool if self.cfg.rewards.latent_outcome else None
        batch.rewards = score(
            batch.traj, lambda latents, captions: self.orm_pool.map_rows("score_latents", latents, captions),
            (lambda latents, cond: prm_pool.map_rows("score_clean", latents, cond.as_dict())) if prm_pool else None)
        batch.timings["reward"] = time.perf_counter() - t0
        return batch

    def learn(self, step: int, batch: LearnBatch, sources: list[Any] | None = None) -> None:
        """Hand ``batch`` to the learner ranks, its groups split evenly over them (non-blocking). With ``sources``
        (``StepBatch.sources``: the rollouts ``batch`` was taken from) a rank is sent those and its rows, and reads
        the latent paths from the rollout workers' answers itself: they do not cross the object store again."""
        assert self.learner is not None
        self._learn_started[step] = time.perf_counter()
        shards, left_out = split_for_learners(batch, self.cfg.cluster.num_learners)
        if left_out:
            self.log(f"step {step}: {left_out} group(s) left out to split evenly over "
                     f"{self.cfg.cluster.num_learners} learners")
        t0 = time.perf_counter()
        # numpy payloads (``wire``), read in place by the learner: the rollouts themselves when the driver has them
        self.learner.submit(step, [[ray.put(pack(
            {"sources": list(sources), "rows": s.rows, "terms": s.terms} if sources and s.traj is not None
            and s.rows is not None else
            {"traj": s.traj.to_dict() if s.traj is not None else None, "terms": s.terms}))] for s in shards])
        self.timings["learn_submit"] = time.perf_counter() - t0

    def learned(self, step: int) -> dict[str, Any]:
        """The learner's statistics for ``step`` (and ``learn`` seconds since it was handed over); stops the run
        when the data-parallel ranks that hold full weights report different digests."""
        assert self.learner is not None
        stats = self.learner.result(step, self.cfg.cluster.timeouts.step_s)
        for note in stats.pop("notes", []):  # a learner restarted by Ray Train (a lost worker) and what it replayed
            self.log(f"step {step}: {note}")
        self.timings["learn"] = time.perf_counter() - self._learn_started.pop(step)
        # under FSDP only rank 0 gathers the full weights: the others report no digest
        if len({r["digest"] for r in stats.get("ranks", [stats]) if r.get("digest") is not None}) > 1:
            raise RunError(f"step {step}: the learner's data-parallel ranks hold different parameters")
        return stats

    def broadcast(self, version: int) -> None:
        """Sync mode: every rollout worker loads ``version`` (``broadcast`` seconds: the slowest worker's); async:
        nothing, a worker fetches the version a request names."""
        self.timings["broadcast"] = 0.0
        if self.cfg.cluster.mode != "sync":
            return
        t0 = time.perf_counter()
        refs = [w.load_weights.remote(version) for w in self.rollout_workers]
        for i, ref in enumerate(refs):
            try:
                ray.get(ref)
            except RETRYABLE:
                self._call(i, "load_weights", version)
        self.timings["broadcast"] = time.perf_counter() - t0

    def evaluate(self, version: int, prompts: list[int], seed: int,
                 conditioning: Callable[[list[int]], tuple[TextConditioning, list[str]]] | None = None,
                 samples_per_prompt: int = 1) -> Tensor:
        """ORM rewards of plain ODE samples (``samples_per_prompt`` per prompt, fixed seeds) with weight
        ``version``; prompts index the training prompts unless ``conditioning`` (e.g. of the held-out evaluation
        prompts) is given."""
        rows = [p for p in prompts for _ in range(samples_per_prompt)]
        members = [m for _ in prompts for m in range(samples_per_prompt)]
        cond, captions = (conditioning or self.conditioning)(prompts)  # read once, then repeated per sample
        cond = cond.repeat_interleave(samples_per_prompt)
        captions = [c for c in captions for _ in range(samples_per_prompt)]
        chunks = torch.arange(len(rows)).tensor_split(min(len(self.rollout_workers), len(rows)))
        requests = [{"version": version, "cond": pack(cond.index(c).as_dict()), "latent_shape": self.latent_shape,
                     "seeds": [sample_seed(seed, -1, int(rows[i]), members[i]) for i in c.tolist()]}
                    for c in chunks]
        latents = torch.cat([unpack(x) for x in self._gather("evaluate", requests)])
        return self.orm_pool.map_rows("score_latents", latents, captions)

    def decode(self, latents: Tensor) -> Tensor:
        return self.orm_pool.run("decode", latents)

    def role_memory(self) -> dict[str, list[dict[str, float]]]:
        """Each role actor's peak CUDA memory and model-loading seconds (``memory()``), by role; the learner's
        peaks come with its step statistics (``gpu_max_*_bytes``) and its loading seconds with ``ready``."""
        assert self.roles is not None
        return {role: ray.get([a.memory.remote() for a in actors])
                for role, actors in (("rollout", self.roles.rollout), ("prm", self.roles.prm), ("orm", self.roles.orm))}

    def worker_digests(self) -> list[tuple[int, str]]:
        return [self._call(i, "param_digest") for i in range(len(self.rollout_workers))]

    def close(self) -> None:
        try:
            if self.learner is not None:
                try:
                    self.learner.close(self.cfg.cluster.timeouts.shutdown_s)
                finally:
                    self.learner = None
        finally:  # a failed learner re-raises its error here; the roles' actors and placement groups go regardless
            if self.roles is not None:
                self.roles.shutdown(self.cfg.cluster.timeouts.shutdown_s)
                self.roles = None

