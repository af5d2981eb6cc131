"""The learner: Ray Train's ``TorchTrainer`` runs the GRPO update loop; the driver feeds it batches.

``TorchTrainer.fit()`` owns its workers (DDP process group: gloo on CPU, NCCL on GPU) and blocks until the loop
function returns, so the driver runs it on a background thread and talks to the loop through ``LearnerHub``, a
small async actor: the driver ``submit``s a step's trajectory shards (one per rank), each rank's loop takes its
shard with ``next_job``, runs ``learning.grpo_update`` (gradients averaged across ranks before each optimizer
step: DDP's all-reduce, or with ``cluster.fsdp`` FSDP2's reduce-scatter over fully sharded fp32 masters and AdamW
state, ``euphonium_ray.sharding``), rank 0 publishes the new weights (version = step + 1) through
``actors.weights`` and writes checkpoints (``checkpoint.save_checkpoint``, atomic, diffusers layout; under FSDP
every rank joins the gather and rank 0 writes) which it also reports to Ray Train with the metrics;
then every rank ``report``s its statistics to the hub, where the driver's ``result`` call picks them up.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch

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
def _average_gradients(world_size: int):
    import torch.distributed as dist

    def sync(params: list[torch.nn.Parameter]) -> None:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world_size)

    return sync


def _broadcast_parameters(policy: Any) -> None:
    import torch.distributed as dist

    with torch.no_grad():
        for t in policy.transformer.state_dict().values():
            dist.broadcast(t, src=0)


def learner_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function. ``config``: cfg (dict), hub, store, resume (path or None), sync_backend,
    num_rollout_workers."""
    import ray.train

    from actors.common import config_from, load_policy, memory_report, release_cached_memory, set_threads
    from actors.weights import make_weight_sync, state_digest
    from euphonium_ray.checkpoint import config_hash, load_checkpoint, read_optimizer_state, save_checkpoint
    from euphonium_ray.learning import grpo_update
    from euphonium_ray.sampling import sample_seed
    from euphonium_ray.sharding import full_model_state, full_optimizer_state, load_full_optimizer_state, \
        shard_transformer
    from euphonium_ray.trajectory import Trajectories

    t_start = time.perf_counter()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = config_from(config["cfg"])
    hub = config["hub"]
    sharded = cfg.cluster.fsdp
    try:
        set_threads(cfg.cluster.learner_cpus)
        import ray.train.torch as rtt

        device = rtt.get_device() if cfg.cluster.learner_gpus > 0 else torch.device("cpu")
        policy = load_policy(cfg, "learner", device)
        o = cfg.optim
        resume = config.get("resume")
        start = int(load_checkpoint(resume, policy)["step"]) if resume else 0
        if world > 1:
            _broadcast_parameters(policy)
        sync_keys = list(policy.sync_state_dict())
        reference = load_policy(cfg, "reference", device) if o.kl_coef > 0 else None
        if sharded:  # each rank keeps 1/world of the fp32 masters, gradients and AdamW moments
            shard_transformer(policy.transformer, compute_dtype=policy.autocast_dtype)
            if reference is not None:
                shard_transformer(reference.transformer, compute_dtype=policy.autocast_dtype)
        optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.adam_eps,
                                      weight_decay=o.weight_decay)
        if resume:
            saved = read_optimizer_state(resume, optimizer)
            if sharded:
                load_full_optimizer_state(policy.transformer, optimizer, saved)
            else:
                optimizer.load_state_dict(saved)
        grad_sync = _average_gradients(world) if world > 1 and not sharded else None  # FSDP reduce-scatters

        def broadcast_state() -> dict[str, torch.Tensor]:
            """What a weight broadcast carries; under FSDP a collective whose full tensors land on rank 0 only."""
            return full_model_state(policy.transformer, sync_keys) if sharded else policy.sync_state_dict()

        sync = None
        if rank == 0:
            sync = make_weight_sync(config["sync_backend"], config["store"], rank=0,
                                    world_size=int(config["num_rollout_workers"]) + 1, device=str(device))
        state = broadcast_state()
        digest = state_digest(state) if state else None
        ray.get(hub.set_ready.remote(rank, {"start_step": start, "digest": digest, "pid": os.getpid(),
                                            "device": str(device), "fsdp": sharded,
                                            "load_seconds": time.perf_counter() - t_start}))
        if sync is not None:
            sync.publish(start, state)
        out_dir = Path(cfg.output.dir)
        while True:
            job = ray.get(hub.next_job.remote(rank))
            if job is None:
                break
            step = int(job["step"])
            shard = job["shard"]
            if isinstance(shard, list):  # [ObjectRef]: fetched here, not copied through the hub
                shard = ray.get(shard[0])
            t0 = time.perf_counter()
            stats: dict[str, Any] = {"num_transitions": 0.0, "num_updates": 0.0}
            if shard["traj"] is not None:  # every group of the step was skipped: the version still advances
                traj = Trajectories.from_dict(shard["traj"])
                terms = [(float(w), a) for w, a in shard["terms"]]
                gen = torch.Generator().manual_seed(sample_seed(cfg.seed, step, -1, rank))
                stats = grpo_update(policy, optimizer, traj, terms, cfg, gen, reference, grad_sync=grad_sync)
            stats["learn_seconds"] = time.perf_counter() - t0
            version = step + 1
            stats["version"] = version
            state = broadcast_state()
            stats["digest"] = state_digest(state) if state else None
            ckpt_path = None
            if version % cfg.output.save_every == 0 or (version == cfg.steps and cfg.output.write_final):
                t1 = time.perf_counter()
                full_optim = full_optimizer_state(policy.transformer, optimizer) if sharded else None
                if rank == 0:
                    run_state = {"weight_version": version, "seed": cfg.seed, "config_hash": config_hash(cfg),
                                 "mode": cfg.cluster.mode}
                    ckpt_path = save_checkpoint(out_dir, version, policy, optimizer, run_state,
                                                keep=cfg.output.keep_checkpoints,
                                                policy_state=state if sharded else None, optimizer_state=full_optim)
                    stats["checkpoint"] = str(ckpt_path)
                    stats["checkpoint_seconds"] = time.perf_counter() - t1
            stats.update({k: v for k, v in memory_report(device).items() if k.startswith("gpu_")})
            release_cached_memory(device, cfg.cluster.learner_gpus)
            scalars = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
            ray_ckpt = ray.train.Checkpoint.from_directory(str(ckpt_path)) if ckpt_path is not None else None
            ray.train.report(scalars, checkpoint=ray_ckpt, checkpoint_dir_name=f"step-{version}" if ray_ckpt else None,
                             delete_local_checkpoint_after_upload=False if ray_ckpt else None)
            if sync is not None and sync.backend == "object_store":
                stats["publish"] = sync.publish(version, state)
            ray.get(hub.report.remote(rank, step, stats))
            if sync is not None and sync.backend == "collective":  # receivers join after the driver sees the report
                sync.publish(version, state)
    except BaseException as exc:
        ray.get(hub.fail.remote(f"rank {rank}: {type(exc).__name__}: {exc}"))
        raise


# ---------------------------------------------------------------------------------------- driver side
class LearnerClient:
    """The driver's handle on the running learner: submit shards, wait for results, stop."""

    def __init__(self, hub: Any, thread: threading.Thread, errors: list[BaseException], world_size: int) -> None:
        self.hub, self.thread, self.errors, self.world_size = hub, thread, errors, world_size

    def wait_ready(self, timeout_s: float = 600.0) -> dict[str, Any]:
        return self._get(self.hub.wait_ready.remote(timeout_s))

    def submit(self, step: int, shards: list[dict[str, Any]]) -> None:
        self._get(self.hub.submit.remote(step, shards))

    def result_ref(self, step: int, timeout_s: float = 3600.0) -> Any:
        return self.hub.result.remote(step, timeout_s)

    def result(self, step: int, timeout_s: float = 3600.0) -> dict[str, Any]:
        return self._get(self.result_ref(step, timeout_s))

    def _get(self, ref: Any) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError:
            if self.errors:
                raise RuntimeError(f"the learner (Ray Train) failed: {self.errors[0]}") from self.errors[0]
            raise

    def close(self, timeout_s: float = 120.0) -> None:
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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as TrainRunConfig, ScalingConfig
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
                                  checkpoint_config=CheckpointConfig(num_to_keep=cfg.output.keep_checkpoints),
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
