"""The learner: Ray Train's ``TorchTrainer`` runs ``euphonium_ray.learner.Learner`` on each rank; the driver feeds it.

``TorchTrainer.fit()`` owns its workers (DDP process group: gloo on CPU, NCCL on GPU) and blocks until the loop
function returns, so the driver runs it on a background thread and talks to the loop through ``LearnerHub``, a
small async actor: the driver ``submit``s a step's shards (one per rank), each rank's loop takes its shard with
``next_job`` and runs ``Learner.step``; rank 0 publishes the new weights (version = step + 1) through
``actors.weights``; every rank ``report``s its statistics to the hub, where the driver's ``result`` call picks them
up; on checkpoint steps the scalars are reported to Ray Train last (the checkpoint itself stays ours: one copy).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import ray
import torch

from euphonium_ray.actors.common import config_from, memory_report, release_cached_memory, set_threads
from euphonium_ray.actors.weights import make_weight_sync
from euphonium_ray.checkpoint import state_digest
from euphonium_ray.step import LearnBatch
from euphonium_ray.trajectory import Trajectories

__all__ = ["LearnerClient", "LearnerHub", "learner_loop", "start_learner"]


@ray.remote(num_cpus=0)
class LearnerHub:
    """Mailbox between the driver and the learner ranks (an async actor: waits do not block other calls)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.jobs: list[asyncio.Queue] = [asyncio.Queue() for _ in range(world_size)]
        self.reports: dict[int, dict[int, dict[str, Any]]] = {}
        self.ready_info: dict[int, dict[str, Any]] = {}
        self.error: str | None = None
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self, done, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if self.error is not None:
                raise RuntimeError(f"learner failed: {self.error}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"learner did not {what} within {timeout_s:.0f}s")
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 5.0))
            except asyncio.TimeoutError:
                pass

    # ------------------------------------------------------------------------------------- learner side
    async def set_ready(self, rank: int, info: dict[str, Any]) -> None:
        self.ready_info[rank] = info
        self._notify()

    async def next_job(self, rank: int) -> dict[str, Any] | None:
        return await self.jobs[rank].get()

    async def report(self, rank: int, step: int, stats: dict[str, Any]) -> None:
        self.reports.setdefault(step, {})[rank] = stats
        self._notify()

    async def fail(self, message: str) -> None:
        self.error = message
        self._notify()

    # -------------------------------------------------------------------------------------- driver side
    async def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        await self._wait(lambda: len(self.ready_info) == self.world_size, timeout_s, "start")
        return self.ready_info[0]

    async def submit(self, step: int, shards: list[Any]) -> None:
        if len(shards) != self.world_size:
            raise ValueError(f"got {len(shards)} shards for {self.world_size} learner ranks")
        for rank, shard in enumerate(shards):
            await self.jobs[rank].put({"step": step, "shard": shard})

    async def result(self, step: int, timeout_s: float) -> dict[str, Any]:
        """Rank 0's statistics of ``step`` (plus ``ranks``: every rank's) once all ranks reported."""
        await self._wait(lambda: len(self.reports.get(step, {})) == self.world_size, timeout_s, f"finish step {step}")
        per_rank = self.reports.pop(step)
        return {**per_rank[0], "ranks": [per_rank[r] for r in range(self.world_size)]}

    async def close(self) -> None:
        for q in self.jobs:
            await q.put(None)


# ------------------------------------------------------------------------------------------- the loop
def learner_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: build this rank's ``Learner``, then serve the hub's jobs until it closes.
    ``config``: cfg (dict), hub, store, resume (path or None), sync_backend, num_rollout_workers."""
    import ray.train
    import ray.train.torch

    from euphonium_ray.learner import Learner

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg, hub = config_from(config["cfg"]), config["hub"]
    try:
        t0 = time.perf_counter()
        set_threads(cfg.cluster.learner_cpus)
        device = ray.train.torch.get_device() if cfg.cluster.learner_gpus > 0 else torch.device("cpu")
        learner = Learner.load(cfg, device, rank=rank, world=world, resume=config.get("resume"))
        sync = make_weight_sync(config["sync_backend"], config["store"], rank=0, device=str(device),
                                world_size=int(config["num_rollout_workers"]) + 1,
                                timeout_s=cfg.cluster.timeouts.weights_s) if rank == 0 else None
        state = learner.weights()
        ray.get(hub.set_ready.remote(rank, {"start_step": learner.start_step, "pid": os.getpid(),
                                            "digest": state_digest(state) if state else None, "device": str(device),
                                            "fsdp": learner.sharded, "load_seconds": time.perf_counter() - t0}))
        if sync is not None:
            sync.publish(learner.start_step, state)
        while (job := ray.get(hub.next_job.remote(rank))) is not None:
            _serve(job, learner, hub, sync, rank, device)
    except BaseException as exc:
        ray.get(hub.fail.remote(f"rank {rank}: {type(exc).__name__}: {exc}"))
        raise


def _serve(job: dict[str, Any], learner: Any, hub: Any, sync: Any, rank: int, device: torch.device) -> None:
    """One job: learn it, hand the result (and, on rank 0, the new weights) to the driver, then, on checkpoint steps,
    report the scalars to Ray Train. ``ray.train.report`` comes last and only then: each call blocks until Ray
    Train's controller polls (every 2 s), which would hold every step."""
    import ray.train

    step, shard = int(job["step"]), job["shard"]
    batch = ray.get(shard[0]) if isinstance(shard, list) else shard  # [ObjectRef]: fetched here, not via the hub
    done = learner.step(step, LearnBatch(Trajectories.from_dict(batch["traj"]) if batch["traj"] is not None else None,
                                         [(float(w), a) for w, a in batch["terms"]]))
    stats = done.stats
    stats.update({k: v for k, v in memory_report(device).items() if k.startswith("gpu_")})
    release_cached_memory(device, learner.cfg.cluster.learner_gpus)
    if sync is not None and sync.backend == "object_store":
        stats["publish"] = sync.publish(step + 1, done.weights)
    ray.get(hub.report.remote(rank, step, stats))
    if sync is not None and sync.backend == "collective":  # receivers join after the driver sees the report
        sync.publish(step + 1, done.weights)
    if learner.writes_checkpoint(step + 1):  # every rank reports its scalars (Ray Train's barrier)
        # Without the folder: the checkpoint is ours (output.dir/checkpoints, what --resume reads); handing it to
        # Ray Train made it copy every checkpoint into its storage, the same bytes twice on disk.
        ray.train.report({k: v for k, v in stats.items() if isinstance(v, (int, float))})


# ---------------------------------------------------------------------------------------- driver side
class LearnerClient:
    """The driver's handle on the running learner: submit shards, wait for results, stop."""

    def __init__(self, hub: Any, thread: threading.Thread, errors: list[BaseException], world_size: int) -> None:
        self.hub, self.thread, self.errors, self.world_size = hub, thread, errors, world_size

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        return self._get(self.hub.wait_ready.remote(timeout_s))

    def submit(self, step: int, shards: list[dict[str, Any]]) -> None:
        self._get(self.hub.submit.remote(step, shards))

    def result_ref(self, step: int, timeout_s: float) -> Any:
        return self.hub.result.remote(step, timeout_s)

    def result(self, step: int, timeout_s: float) -> dict[str, Any]:
        return self._get(self.result_ref(step, timeout_s))

    def _get(self, ref: Any) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError:
            if self.errors:
                raise RuntimeError(f"the learner (Ray Train) failed: {self.errors[0]}") from self.errors[0]
            raise

    def close(self, timeout_s: float) -> None:
        try:
            ray.get(self.hub.close.remote())
        except ray.exceptions.RayError:
            pass
        self.thread.join(timeout=timeout_s)
        if self.errors:
            raise RuntimeError(f"the learner (Ray Train) failed: {self.errors[0]}") from self.errors[0]


def start_learner(cfg: Any, *, store: Any, resume: str | None, sync_backend: str, storage_path: str,
                  run_name: str) -> LearnerClient:
    """Start the TorchTrainer on a background thread; returns once the hub exists (call ``wait_ready``)."""
    from ray.train import FailureConfig, RunConfig as TrainRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    c = cfg.cluster
    hub = LearnerHub.remote(c.num_learners)
    use_gpu = c.learner_gpus > 0
    resources = {"CPU": c.learner_cpus, **c.resources.get("learner", {})}
    if use_gpu:
        resources["GPU"] = c.learner_gpus
    trainer = TorchTrainer(
        learner_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "hub": hub, "store": store, "resume": resume,
                           "sync_backend": sync_backend, "num_rollout_workers": c.num_rollout_workers},
        scaling_config=ScalingConfig(num_workers=c.num_learners, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy="PACK"),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=TrainRunConfig(name=run_name, storage_path=storage_path,
                                  failure_config=FailureConfig(max_failures=0)),
    )
    errors: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - surfaced through LearnerClient
            errors.append(exc)
            try:
                ray.get(hub.fail.remote(f"{type(exc).__name__}: {exc}"))
            except ray.exceptions.RayError:
                pass

    thread = threading.Thread(target=fit, name="euphonium-learner", daemon=True)
    thread.start()
    return LearnerClient(hub, thread, errors, c.num_learners)
