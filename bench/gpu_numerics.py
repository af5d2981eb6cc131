"""Do the rollout's and the learner's log-probs agree on the GPU? The first-update importance ratio, TF32 on and off.

A GRPO update recomputes ``log π(x_{k+1}|x_k)`` for the rollout's transitions; on-policy, the ratio to the stored
log-prob must be 1 (to ~1e-6: upstream's clip range is 1e-4). The rollout runs the network at batch B and the
learner at B·(selected transitions), so anything batch-size dependent shows up in the ratio. TF32 is one such
thing: PyTorch leaves it off for matmuls but cuDNN turns it on for convolutions (the patch embedding) unless
told not to. This runs one DanceGRPO step of the toy world (a plain policy, and a 4-member ensemble) with
``model.tf32`` off and on and prints the first update's ratio extremes; JSON to ``--out``.

    python bench/gpu_numerics.py --device cuda --out OUT/numerics.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from euphonium_ray.bench.runner import EnsembleRun  # noqa: E402
from euphonium_ray.bench.settings import load_method_config, task_overrides, load_settings  # noqa: E402
from euphonium_ray.bench.world import BenchWorld, prepare_world  # noqa: E402
from euphonium_ray.models.hunyuan import set_tf32  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"


def first_ratio(world: BenchWorld, cfg, seeds: list[int], noise: torch.Tensor) -> dict[str, float]:
    run = EnsembleRun("centered", "dance-grpo", cfg, world, seeds, noise, 1)
    recs = run.step()
    lo = min(r["learner/first_ratio_min"] for r in recs)
    hi = max(r["learner/first_ratio_max"] for r in recs)
    return {"first_ratio_min": lo, "first_ratio_max": hi, "max_abs_deviation": max(abs(lo - 1), abs(hi - 1)),
            "seconds": recs[0]["seconds"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=Path("outputs/numerics.json"))
    p.add_argument("--work", type=Path, default=Path("outputs/numerics-world"))
    a = p.parse_args()
    settings = load_settings(CONFIGS)
    results = {"device": a.device, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "runs": []}
    for tf32 in (False, True):
        cfg = load_method_config(CONFIGS / "dance-grpo.yaml",
                                 [*task_overrides(settings.tasks["centered"]), f"model.tf32={str(tf32).lower()}"])
        world = BenchWorld(prepare_world(cfg, a.work, "toy", log=lambda m: None), cfg, settings.heldout_prompts,
                           settings.heldout_seed, a.device)
        set_tf32(tf32)
        noise = world.heldout_noise(1, 0)
        for seeds in ([100], [100, 101, 102, 103]):
            t0 = time.perf_counter()
            row = {"tf32": tf32, "members": len(seeds),
                   "flags": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
                   **first_ratio(world, cfg, seeds, noise), "wall": time.perf_counter() - t0}
            results["runs"].append(row)
            print(f"tf32={tf32} members={len(seeds)}: first-update ratio in [{row['first_ratio_min']:.8f}, "
                  f"{row['first_ratio_max']:.8f}] (max |ratio-1| {row['max_abs_deviation']:.2e}), step {row['seconds']:.2f}s",
                  flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
