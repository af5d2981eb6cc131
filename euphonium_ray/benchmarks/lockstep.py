"""The in-process runner: every (method, seed) advanced in lock-step rounds, optionally in several processes.

A round gives each run one training step, in an order that rotates every round, so the load of a shared machine
falls on all methods alike, and a time limit stops all of a process's runs at the same step. With ``workers`` > 1
the (method, seed) runs are dealt round-robin to that many processes (one thread each, by default), each advancing
its share in lock-step; all processes run side by side, so every method still sees the same machine. Held-out evaluation runs before step 0, every K steps and at the end.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import torch

from euphonium_ray.benchmarks import records
from euphonium_ray.benchmarks.settings import BenchmarkSettings
from euphonium_ray.benchmarks.world import BenchWorld, WorldPaths
from euphonium_ray.config import RunConfig

Log = Callable[[str], None]


def run_pairs(paths: WorldPaths, settings: BenchmarkSettings, configs: dict[str, RunConfig],
              pairs: list[tuple[str, int]], out: Path, device: str, threads: int, deadline: float | None,
              log: Log = print) -> dict[str, Any]:
    """Train the (method, seed) ``pairs`` in lock-step in this process; ``deadline`` is a ``time.time()`` instant."""
    from euphonium_ray.benchmarks.runner import MethodRun

    torch.set_num_threads(threads)
    base = next(iter(configs.values()))
    world = BenchWorld(paths, base, settings.heldout_prompts, settings.heldout_seed, device)
    noise = world.heldout_noise(settings.eval_samples_per_prompt, settings.eval_seed)
    runs = [MethodRun(m, configs[m], world, s, noise, settings.eval_samples_per_prompt) for m, s in pairs]
    for r in runs:
        for name in (records.STEPS_FILE, records.EVALS_FILE):
            (records.run_dir(out, r.method, r.seed) / name).unlink(missing_ok=True)
    budget = base.steps
    log(f"{len(runs)} runs ({', '.join(f'{m}/seed {s}' for m, s in pairs)}), budget {budget} steps, "
        f"threads {threads}, device {world.device}")

    def evaluate_all() -> None:
        means: dict[str, list[float]] = {}
        for r in runs:
            rec = r.evaluate()
            records.append_jsonl(records.run_dir(out, r.method, r.seed) / records.EVALS_FILE, rec)
            means.setdefault(r.method, []).append(rec["heldout_reward"])
        log(f"  eval @ step {runs[0].steps_done}: " + ", ".join(f"{m} {sum(v) / len(v):.4f}" for m, v in means.items()))

    started = time.monotonic()
    for t in range(budget):
        if t % settings.eval_every == 0:
            evaluate_all()
        shift = t % len(runs)
        rewards: dict[str, list[float]] = {}
        for r in runs[shift:] + runs[:shift]:
            rec = r.step()
            records.append_jsonl(records.run_dir(out, r.method, r.seed) / records.STEPS_FILE, rec)
            rewards.setdefault(r.method, []).append(rec["train_reward"])
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

    return run_pairs(*rest, log=log)


def run_in_process(paths: WorldPaths, settings: BenchmarkSettings, configs: dict[str, RunConfig], seeds: list[int],
                   out: Path, *, device: str, threads: int, workers: int, max_minutes: float | None,
                   log: Log) -> dict[str, Any]:
    """All runs in this process (``workers`` = 1) or dealt round-robin over ``workers`` spawned processes."""
    deadline = None if max_minutes is None else time.time() + 60 * max_minutes
    pairs = [(m, s) for s in seeds for m in configs]
    groups = [pairs[i::workers] for i in range(max(1, min(workers, len(pairs))))]
    started = time.monotonic()
    if len(groups) == 1:
        results = [run_pairs(paths, settings, configs, pairs, out, device, threads, deadline, log)]
    else:
        log(f"{len(groups)} worker processes, {len(pairs)} runs dealt round-robin")
        jobs = [(paths, settings, configs, g, out, device, threads, deadline, f"worker {i}") for i, g in enumerate(groups)]
        with ProcessPoolExecutor(len(groups), mp_context=get_context("spawn")) as pool:
            results = list(pool.map(_worker, jobs))
    return {"steps_run": min(r["steps_run"] for r in results), "threads": threads, "workers": len(groups),
            "device": device, "wall_seconds_total": time.monotonic() - started}
