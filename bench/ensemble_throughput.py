"""Seconds per training step of the convergence benchmark's runs, alone and as batched ensembles, in one process.

Plans the GPU time of bench/PROTOCOL.md: for a few methods on one task, one training step of a run alone (K = 1,
a plain policy) and of K seeds as one ``PolicyEnsemble``, after a warm-up step, with ``torch.cuda.synchronize``
around each step; prints seconds per step and per run-step, writes JSON.

    python bench/ensemble_throughput.py --device cuda --out OUT/throughput.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from euphonium_ray.bench.runner import EnsembleRun  # noqa: E402
from euphonium_ray.bench.settings import load_method_config, load_settings, task_overrides  # noqa: E402
from euphonium_ray.bench.world import BenchWorld, prepare_world  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--task", default="centered")
    p.add_argument("--methods", nargs="+", default=["dance-grpo", "euph-credit-half05", "oracle-credit"])
    p.add_argument("--members", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--out", type=Path, default=Path("outputs/throughput.json"))
    p.add_argument("--work", type=Path, default=Path("outputs/throughput-world"))
    a = p.parse_args()
    settings = load_settings(CONFIGS)
    rows = []
    world = None
    for method in a.methods:
        cfg = load_method_config(CONFIGS / f"{method}.yaml", [*task_overrides(settings.tasks[a.task]), *a.sets])
        if world is None:
            world = BenchWorld(prepare_world(cfg, a.work, "toy", log=lambda m: None), cfg, settings.heldout_prompts,
                               settings.heldout_seed, a.device)
            noise = world.heldout_noise(settings.eval_samples_per_prompt, settings.eval_seed)
        for k in a.members:
            run = EnsembleRun(a.task, method, cfg, world, list(range(100, 100 + k)), noise,
                              settings.eval_samples_per_prompt)
            run.step()  # warm-up
            secs = [run.step()[0]["seconds"] for _ in range(a.steps)]
            t0 = time.perf_counter()
            run.evaluate()
            ev = time.perf_counter() - t0
            row = {"method": method, "members": k, "seconds_per_step": statistics.median(secs),
                   "seconds_per_run_step": statistics.median(secs) / k, "eval_seconds": ev,
                   "timings_last": run.step()[0]["timings"]}
            rows.append(row)
            print(f"{method:>20} K={k}: {row['seconds_per_step']:.3f} s/step, {row['seconds_per_run_step']:.3f} "
                  f"s/run-step, eval {ev:.2f}s, {row['timings_last']}", flush=True)
            del run
            if a.device == "cuda":
                torch.cuda.empty_cache()
    info = {"device": a.device, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "tf32": torch.backends.cuda.matmul.allow_tf32, "task": a.task, "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
