"""The in-process runner: every (task, method, seeds) unit advanced in lock-step rounds, optionally in several
processes.

A unit is one method on one task at a block of seeds, trained as one ensemble (``runner.EnsembleRun``; one seed per
unit reproduces a plain run). A round gives each unit one training step, in an order that rotates every round, so
the load of a shared machine falls on all methods alike, and a time limit stops all of a process's units at the same
step. With ``workers`` > 1 the units are dealt round-robin to that many processes (on a GPU they share the device),
each advancing its share in lock-step. Held-out evaluation runs before step 0, every K steps and at the end.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import torch

from euphonium_ray.bench import records
from euphonium_ray.bench.settings import BenchmarkSettings
from euphonium_ray.bench.world import BenchWorld, WorldPaths
from euphonium_ray.config import RunConfig

Log = Callable[[str], None]
Unit = tuple[str, str, tuple[int, ...]]  # (task, method, seeds)


def plan_units(tasks: list[str], methods: list[str], seeds: list[int], seeds_per_unit: int) -> list[Unit]:
    """Every (task, method) with its seeds cut into blocks of ``seeds_per_unit`` (one ensemble each)."""
    blocks = [tuple(seeds[i:i + seeds_per_unit]) for i in range(0, len(seeds), seeds_per_unit)]
    return [(t, m, b) for t in tasks for m in methods for b in blocks]


def run_units(paths: WorldPaths, settings: BenchmarkSettings, configs: dict[str, dict[str, RunConfig]],
              units: list[Unit], out: Path, device: str, threads: int, deadline: float | None,
              log: Log = print) -> dict[str, Any]:
    """Train ``units`` in lock-step in this process; ``configs[task][method]``; ``deadline`` a ``time.time()``."""
    from euphonium_ray.bench.runner import EnsembleRun

    torch.set_num_threads(threads)
    base = next(iter(next(iter(configs.values())).values()))
    world = BenchWorld(paths, base, settings.heldout_prompts, settings.heldout_seed, device)
    noise = world.heldout_noise(settings.eval_samples_per_prompt, settings.eval_seed)
    runs = [EnsembleRun(t, m, configs[t][m], world, list(s), noise, settings.eval_samples_per_prompt)
            for t, m, s in units]
    for run in runs:
        for seed in run.seeds:
            for name in (records.STEPS_FILE, records.EVALS_FILE):
                (records.run_dir(out, run.task, run.method, seed) / name).unlink(missing_ok=True)
    budget = base.steps
    log(f"{len(runs)} units ({sum(len(r.seeds) for r in runs)} runs), budget {budget} steps, threads {threads}, "
        f"device {world.device}")

    def write(kind: str, recs: list[dict[str, Any]]) -> None:
        for rec in recs:
            records.append_jsonl(records.run_dir(out, rec["task"], rec["method"], rec["seed"]) / kind, rec)

    def evaluate_all() -> None:
        means: dict[str, list[float]] = {}
        for r in runs:
            recs = r.evaluate()
            write(records.EVALS_FILE, recs)
            means.setdefault(f"{r.task}/{r.method}", []).extend(x["heldout_reward"] for x in recs)
        log(f"  eval @ step {runs[0].steps_done}: " + ", ".join(f"{m} {sum(v) / len(v):.4f}" for m, v in means.items()))

    started = time.monotonic()
    for t in range(budget):
        if t % settings.eval_every == 0:
            evaluate_all()
        shift = t % len(runs)
        rewards: dict[str, list[float]] = {}
        for r in runs[shift:] + runs[:shift]:
            recs = r.step()
            write(records.STEPS_FILE, recs)
            rewards.setdefault(f"{r.task}/{r.method}", []).extend(x["train_reward"] for x in recs)
        if (t + 1) % max(1, settings.eval_every) == 0 or t == 0:
            log(f"step {t + 1}/{budget} ({time.monotonic() - started:.0f}s): train reward "
                + ", ".join(f"{m} {sum(v) / len(v):.4f}" for m, v in rewards.items()))
        if deadline is not None and time.time() > deadline and t + 1 < budget:
            log(f"time limit reached: these runs stop after {t + 1} steps")
            break
    evaluate_all()
    return {"steps_run": runs[0].steps_done, "wall_seconds": time.monotonic() - started}


def _worker(args: tuple) -> dict[str, Any]:
    *rest, prefix = args

    def log(msg: str) -> None:
        print(f"[{prefix}] {msg}", flush=True)

    return run_units(*rest, log=log)


def run_in_process(paths: WorldPaths, settings: BenchmarkSettings, configs: dict[str, dict[str, RunConfig]],
                   seeds: list[int], out: Path, *, device: str, threads: int, workers: int, seeds_per_unit: int,
                   max_minutes: float | None, log: Log) -> dict[str, Any]:
    """All units in this process (``workers`` = 1) or dealt round-robin over ``workers`` spawned processes."""
    deadline = None if max_minutes is None else time.time() + 60 * max_minutes
    tasks = list(configs)
    methods = list(next(iter(configs.values())))
    units = plan_units(tasks, methods, seeds, seeds_per_unit)
    groups = [units[i::workers] for i in range(min(workers, len(units)))]
    started = time.monotonic()
    if len(groups) == 1:
        results = [run_units(paths, settings, configs, units, out, device, threads, deadline, log)]
    else:
        log(f"{len(groups)} worker processes, {len(units)} units dealt round-robin")
        jobs = [(paths, settings, configs, g, out, device, threads, deadline, f"worker {i}") for i, g in enumerate(groups)]
        with ProcessPoolExecutor(len(groups), mp_context=get_context("spawn")) as pool:
            results = list(pool.map(_worker, jobs))
    return {"steps_run": min(r["steps_run"] for r in results), "threads": threads, "workers": len(groups),
            "seeds_per_unit": seeds_per_unit, "device": device, "wall_seconds_total": time.monotonic() - started}
