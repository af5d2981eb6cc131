"""The benchmark's runs on a local Ray, through the driver (``euphonium_ray.driver.train``), one run after another.

The driver trains on a prompt index holding only the world's training prompts (so its prompt order and per-sample
seeds are the in-process runner's), and calls back after every step; the callback logs the step (ORM reward of
the rollouts, the driver's own step seconds) and, every K steps, fetches the newest weights from the weight store
and scores unguided ODE samples on the held-out prompts with the same code and fixed noise as the in-process runner.
Evaluation time is outside the driver's step timing, as in-process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from euphonium_ray.bench import records
from euphonium_ray.bench.runner import heldout_reward
from euphonium_ray.bench.settings import BenchmarkSettings
from euphonium_ray.bench.world import BenchWorld
from euphonium_ray.config import RunConfig

Log = Callable[[str], None]


def driver_config(cfg: RunConfig, world: BenchWorld, train_index: Path, seed: int, out_dir: Path) -> RunConfig:
    """The method's config pointed at the benchmark's world, training prompts and output folder."""
    rcfg = cfg.model_copy(deep=True)
    rcfg.seed = seed
    rcfg.model.path = str(world.paths.model_dir)
    rcfg.data.prompts = str(train_index)
    rcfg.data.eval_prompts = None  # the benchmark evaluates on its own held-out prompts (not the demo's split)
    if not rcfg.rewards.prm.path:
        rcfg.rewards.prm.path = str(world.paths.prm_dir)
    rcfg.output.dir = str(out_dir)
    rcfg.output.eval_every = 0  # the benchmark evaluates on its own held-out prompts
    rcfg.output.save_every = rcfg.steps  # one checkpoint, at the end
    rcfg.output.sample_every = rcfg.steps
    rcfg.output.tensorboard = False
    return rcfg


class _RayRunLogger:
    """The driver's step callback for one (task, method, seed) run."""

    def __init__(self, task: str, method: str, seed: int, world: BenchWorld, cfg: RunConfig,
                 settings: BenchmarkSettings, out: Path, log: Log) -> None:
        self.task, self.method, self.seed, self.world, self.cfg, self.settings = task, method, seed, world, cfg, settings
        self.orm = world.reward(cfg)
        self.dir = records.run_dir(out, task, method, seed)
        for name in (records.STEPS_FILE, records.EVALS_FILE):
            (self.dir / name).unlink(missing_ok=True)
        self.policy = world.load_policy("lora" if cfg.model.trainable == "lora" else "none", seed=seed)
        self.noise = world.heldout_noise(settings.eval_samples_per_prompt, settings.eval_seed)
        self.version = 0
        self.cum_seconds = 0.0
        self.sync: Any = None
        self.log = log

    def _evaluate(self, system: Any, version: int) -> None:
        import time

        from euphonium_ray.actors.weights import make_weight_sync

        t0 = time.perf_counter()
        if self.sync is None:
            self.sync = make_weight_sync("object_store", system.store)
        if version != self.version:
            got, state = self.sync.fetch(version, self.version, 600.0)
            if got != version or state is None:
                raise RuntimeError(f"{self.method}/seed {self.seed}: wanted weight version {version}, got {got}")
            self.policy.load_sync_state_dict(state)
            self.version = got
        r = heldout_reward(self.policy, self.world, self.cfg, self.orm, self.noise,
                           self.settings.eval_samples_per_prompt)[0]
        records.append_jsonl(self.dir / records.EVALS_FILE, {
            "task": self.task, "method": self.method, "seed": self.seed, "step": version, "heldout_reward": float(r.mean()), "heldout_reward_std": float(r.std()) if r.numel() > 1 else 0.0,
            "cum_seconds": self.cum_seconds, "eval_seconds": time.perf_counter() - t0,
        })

    def __call__(self, event: str, step: int, system: Any, record: dict[str, Any] | None) -> None:
        if event == "step_start" and step == 0:
            self._evaluate(system, 0)
        if event != "step_end" or record is None:
            return
        s = record["scalars"]
        seconds = float(s["time/step"])
        self.cum_seconds += seconds
        records.append_jsonl(self.dir / records.STEPS_FILE, {
            "task": self.task, "method": self.method, "seed": self.seed, "step": step,
            "train_reward": float(s["reward/orm_mean"]),
            "train_reward_std": float(s["reward/orm_std"]),
            "seconds": seconds,
            "cum_seconds": self.cum_seconds,
            "guidance_norm": float(s.get("rollout/guidance_grad_norm", 0.0)),
            "timings": {k.removeprefix("time/"): v for k, v in s.items() if k.startswith("time/")},
            **{k: v for k, v in s.items() if k.startswith("learner/")},
        })
        done = step + 1
        if done % self.settings.eval_every == 0 or done == self.cfg.steps:
            self._evaluate(system, done)
        self.log(f"  {self.task}/{self.method}/seed {self.seed} step {done}/{self.cfg.steps}: train reward "
                 f"{float(s['reward/orm_mean']):.4f} ({seconds:.1f}s)")


def run_on_ray(world: BenchWorld, settings: BenchmarkSettings, configs: dict[str, dict[str, RunConfig]],
               seeds: list[int], out: Path, log: Log) -> dict[str, Any]:
    """Each (task, method, seed) through ``driver.train`` on one local Ray started here (seeds outer)."""
    import time

    import ray

    from euphonium_ray.driver import train

    train_index = world.write_prompt_index(out / "world" / "train_prompts.json", world.train)
    base = next(iter(next(iter(configs.values())).values()))
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=base.cluster.num_cpus or 2,
                 object_store_memory=base.cluster.object_store_memory or 200 * 1024**2, include_dashboard=False,
                 _node_ip_address="127.0.0.1")
    t0 = time.monotonic()
    try:
        for seed in seeds:
            for task, per_method in configs.items():
                for method, cfg in per_method.items():
                    rcfg = driver_config(cfg, world, train_index, seed, out / "driver" / task / method / f"seed-{seed}")
                    log(f"{task}/{method}/seed {seed}: driver.train on local Ray ({rcfg.steps} steps)")
                    hook = _RayRunLogger(task, method, seed, world, rcfg, settings, out, log)
                    # evaluate=False: the driver's own before/after ODE evaluation would go unused (the hook
                    # evaluates on the benchmark's held-out prompts)
                    train(rcfg, progress=False, on_event=hook, evaluate=False)
    finally:
        if started_ray:
            ray.shutdown()
    return {"steps_run": base.steps, "device": "cpu (Ray actors)", "wall_seconds_total": time.monotonic() - t0}
