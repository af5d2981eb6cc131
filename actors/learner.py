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
from euphonium_ray.step import LearnBatch
from euphonium_ray.trajectory import Trajectories
from euphonium_ray.wire import unpack

__all__ = ["LearnerClient", "LearnerHub", "learner_loop", "start_learner"]


@ray.remote(num_cpus=0)
class LearnerHub:
    """Mailbox between the driver and the learner ranks (an async actor: waits do not block other calls).

    Jobs are kept by step, not queued: a rank asks for the step it needs. The jobs since the newest checkpoint the
    driver has seen stay here, so that a learner Ray Train restarts (a lost worker process) resumes from that
    checkpoint and replays them; a replayed step must give the digest it gave the first time."""

    def __init__(self, world_size: int, start_step: int = 0, resume: str | None = None) -> None:
        self.world_size = world_size
        self.jobs: dict[int, list[Any]] = {}  # step -> one shard per rank
        self.reports: dict[int, dict[int, dict[str, Any]]] = {}
        self.ready_info: dict[int, dict[str, Any]] = {}
        self.error: str | None = None
        self.fatal: BaseException | None = None  # a rank's own error: a restarted rank raises it again
        self.closed = False
        self.taken = start_step  # the first step whose result the driver has not taken
        self.floor: tuple[int, str | None] = (start_step, resume)  # the newest checkpoint the driver has seen
        self.digests: dict[int, str | None] = {}  # rank 0's digest of each taken step since the floor
        self.generation = [0] * world_size  # starts of each rank (Ray Train restarts the whole group)
        self.restarts = 0
        self.notes: list[str] = []
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
    async def join(self, rank: int) -> dict[str, Any] | None:
        """A rank starts: its generation and where to resume from (None: the run is over). A restarted rank
        resumes from the newest complete checkpoint between the floor and the first step not yet taken."""
        if self.closed:
            return None
        generation = self.generation[rank]
        self.generation[rank] += 1
        if generation == 0:
            return {"generation": 0, "resume": self.floor[1]}
        if rank == 0:
            self.restarts += 1
        # what the lost group reported for steps not yet taken is redone by the restarted one
        self.reports = {s: r for s, r in self.reports.items() if s < self.taken}
        return {"generation": generation, "floor": list(self.floor), "until": self.taken}

    async def set_ready(self, rank: int, generation: int, info: dict[str, Any]) -> None:
        self.ready_info[rank] = info
        if generation > 0 and rank == 0:
            start = int(info["start_step"])
            self.notes.append(f"the learner lost a worker and Ray Train restarted it (restart {self.restarts}): "
                              f"resumed at step {start}, replaying steps {start}..{self.taken - 1} before step "
                              f"{self.taken}" if start < self.taken else
                              f"the learner lost a worker and Ray Train restarted it (restart {self.restarts}): "
                              f"resumed at step {start}")
        self._notify()

    async def next_job(self, rank: int, generation: int, step: int) -> dict[str, Any] | None:
        """Rank ``rank``'s shard of ``step`` once the driver submitted it; None when the run is over (or the asking
        process belongs to a group Ray Train has replaced)."""
        while step not in self.jobs and not self.closed and generation == self.generation[rank] - 1:
            await self._changed.wait()
        if self.closed or generation != self.generation[rank] - 1:
            return None
        return {"step": step, "shard": self.jobs[step][rank]}

    async def report(self, rank: int, generation: int, step: int, stats: dict[str, Any]) -> None:
        if generation != self.generation[rank] - 1:
            return  # a report sent by a process of the group Ray Train replaced
        if step < self.taken:  # a replayed step: it must land on the weights it gave before
            if rank == 0 and stats.get("digest") != self.digests.get(step, stats.get("digest")):
                self.error = (f"step {step}, replayed after the learner's restart, gave different weights "
                              f"({stats.get('digest')} != {self.digests.get(step)})")
            self._notify()
            return
        self.reports.setdefault(step, {})[rank] = stats
        self._notify()

    async def fail(self, message: str, error: BaseException | None = None) -> None:
        self.error = message
        if error is not None:
            self.fatal = error
        self._notify()

    async def fatal_error(self) -> BaseException | None:
        return self.fatal

    async def pids(self) -> dict[int, int]:
        """The learner ranks' process ids, of the group running now."""
        return {rank: int(info["pid"]) for rank, info in self.ready_info.items()}

    # -------------------------------------------------------------------------------------- driver side
    async def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        await self._wait(lambda: len(self.ready_info) == self.world_size, timeout_s, "start")
        return self.ready_info[0]

    async def submit(self, step: int, shards: list[Any]) -> None:
        if len(shards) != self.world_size:
            raise ValueError(f"got {len(shards)} shards for {self.world_size} learner ranks")
        self.jobs[step] = list(shards)
        self._notify()

    async def result(self, step: int, timeout_s: float) -> dict[str, Any]:
        """Rank 0's statistics of ``step`` (plus ``ranks``: every rank's, and ``notes``: the learner's restarts since
        the last result) once all ranks reported. A checkpoint among them becomes the floor: the jobs before it go."""
        await self._wait(lambda: len(self.reports.get(step, {})) == self.world_size, timeout_s, f"finish step {step}")
        per_rank = self.reports.pop(step)
        first = per_rank[0]
        self.taken = max(self.taken, step + 1)
        self.digests[step] = first.get("digest")
        if first.get("checkpoint"):
            self.floor = (int(first["version"]), str(first["checkpoint"]))
            for old in [s for s in self.jobs if s < self.floor[0]]:
                del self.jobs[old]
            for old in [s for s in self.digests if s < self.floor[0]]:
                del self.digests[old]
        notes, self.notes = self.notes, []
        return {**first, "ranks": [per_rank[r] for r in range(self.world_size)], "notes": notes}

    async def close(self) -> None:
        self.closed = True
        self._notify()


# ------------------------------------------------------------------------------------------- the loop
def _lost_peer(exc: BaseException) -> bool:
    """Whether a rank's error is the collateral of another rank's death (a collective that lost a member), which a
    restart of the group cures, rather than the learner's own failure."""
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, dist.DistError) or any(s in text for s in ("Connection closed by peer",
                                                                       "Connection reset by peer", "Broken pipe"))


def learner_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: build this rank's ``Learner``, then serve the hub's jobs until it closes.
    ``config``: cfg (dict), hub, store, sync_backend, num_rollout_workers.

    Started again by Ray Train after a worker process is lost (``cluster.max_learner_restarts``): each rank then
    resumes from the newest complete checkpoint the hub allows and replays the kept jobs from there. The rank's own
    errors are final: the hub keeps the first, and a restarted rank raises it again at once."""
    import ray.train
    import ray.train.torch

    from euphonium_ray.checkpoint import config_hash, restart_checkpoint
    from euphonium_ray.learner import Learner
    from euphonium_ray.roles import rollout_weight_dtype

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg, hub = config_from(config["cfg"]), config["hub"]
    fatal = ray.get(hub.fatal_error.remote())
    if fatal is not None:
        raise fatal
    start = ray.get(hub.join.remote(rank))
    if start is None:  # the driver has already closed the run
        return
    generation = int(start["generation"])
    try:
        t0 = time.perf_counter()
        set_threads(cfg.cluster.learner_cpus)
        device = ray.train.torch.get_device() if cfg.cluster.learner_gpus > 0 else torch.device("cpu")
        if generation == 0:
            resume = start["resume"]
        else:
            if config["sync_backend"] == "collective":
                raise RuntimeError("a restarted learner cannot rejoin the rollout workers' collective weight "
                                   "broadcast; set cluster.weight_sync=object_store to survive a lost learner, or "
                                   "cluster.max_learner_restarts=0")
            floor_step, floor_path = start["floor"]
            found = restart_checkpoint(cfg.output.dir, int(floor_step), int(start["until"]), config_hash(cfg))
            resume = str(found) if found is not None else floor_path
        learner = Learner.load(cfg, device, rank=rank, world=world, resume=resume)
        sync = make_weight_sync(config["sync_backend"], config["store"], rank=0, device=str(device),
                                world_size=int(config["num_rollout_workers"]) + 1,
                                timeout_s=cfg.cluster.timeouts.weights_s, dtype=rollout_weight_dtype(cfg),
                                slots=1 if cfg.cluster.mode == "sync" else 2) if rank == 0 else None
        state = learner.weights()
        if sync is not None and generation > 0:  # the versions the lost rank 0 published died with it
            ray.get(config["store"].rewind.remote(learner.start_step))
        ray.get(hub.set_ready.remote(rank, generation, {
            "start_step": learner.start_step, "pid": os.getpid(), "digest": learner.digest(state, learner.start_step),
            "device": str(device), "fsdp": learner.sharded, "load_seconds": time.perf_counter() - t0}))
        if sync is not None:
            sync.publish(learner.start_step, state)
        step = learner.start_step
        while (job := ray.get(hub.next_job.remote(rank, generation, step))) is not None:
            _serve(job, learner, hub, sync, rank, generation, device)
            step += 1
    except BaseException as exc:
        if not _lost_peer(exc):
            message = f"rank {rank}: {type(exc).__name__}: {exc}"
            try:
                ray.get(hub.fail.remote(message, exc))
            except Exception:  # noqa: BLE001 (an error Ray cannot carry: its line is enough)
                ray.get(hub.fail.remote(message))
        raise


def _serve(job: dict[str, Any], learner: Any, hub: Any, sync: Any, rank: int, generation: int,
           device: torch.device) -> None:
    """One job: learn it, hand the result (and, on rank 0, the new weights) to the driver, then, on checkpoint steps,
    report the scalars to Ray Train. ``ray.train.report`` comes last and only then: each call blocks until Ray
    Train's controller polls (every 2 s), which would hold every step."""
    import ray.train

    step, shard = int(job["step"]), job["shard"]
    t0 = time.perf_counter()
    batch = ray.get(shard[0]) if isinstance(shard, list) else shard  # [ObjectRef]: fetched here, not via the hub
    batch = unpack(batch, device)  # out of shared memory straight onto the learner's device
    if "sources" in batch:  # the rollout workers' answers and this rank's rows of them (selected on the device)
        parts = [Trajectories.from_dict(unpack(answer["traj"], device)) for answer in ray.get(batch["sources"])]
        traj: Trajectories | None = Trajectories.cat(parts).select(batch["rows"].to(device))
    else:
        traj = Trajectories.from_dict(batch["traj"]) if batch["traj"] is not None else None
    fetched = time.perf_counter() - t0
    done = learner.step(step, LearnBatch(traj, [(float(w), a) for w, a in batch["terms"]]))
    stats = done.stats
    stats["batch_fetch_seconds"] = fetched
    stats.update({k: v for k, v in memory_report(device).items() if k.startswith("gpu_")})
    release_cached_memory(device, learner.cfg.cluster.learner_gpus)
    if sync is not None and sync.backend == "object_store":
        stats["publish"] = sync.publish(step + 1, done.weights)
    ray.get(hub.report.remote(rank, generation, step, stats))
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

    def pids(self) -> dict[int, int]:
        """The running learner ranks' process ids (those of the group Ray Train started last, once it is ready)."""
        return self._get(self.hub.pids.remote())

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

    from euphonium_ray.checkpoint import read_state

    c = cfg.cluster
    hub = LearnerHub.remote(c.num_learners, int(read_state(resume)["step"]) if resume else 0, resume)
    use_gpu = c.learner_gpus > 0
    resources = {"CPU": c.learner_cpus, **c.resources.get("learner", {})}
    if use_gpu:
        resources["GPU"] = c.learner_gpus
    trainer = TorchTrainer(
        learner_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "hub": hub, "store": store,
                           "sync_backend": sync_backend, "num_rollout_workers": c.num_rollout_workers},
        scaling_config=ScalingConfig(num_workers=c.num_learners, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy="PACK"),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=TrainRunConfig(name=run_name, storage_path=storage_path,
                                  failure_config=FailureConfig(max_failures=c.max_learner_restarts)),
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
