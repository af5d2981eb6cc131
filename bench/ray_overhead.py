"""What running through Ray costs: the same training steps in one process vs on local Ray, side by side.

Both paths call the same library functions with the same config and seeds: ``sample_trajectories`` (RGG with the
PRM), codec decode + ORM, the latent-outcome PRM score, ``compute_advantages``, ``grpo_update`` and a weight load
into the rollout copy. The in-process path times each phase around those calls; the Ray path is
``driver.train`` (rollout worker, reward pools, Ray Train learner, weight store) and reports the same phases.
Steps after the first (``--warmup``) are averaged. Prints a table and writes JSON.

    .venv/bin/python bench/ray_overhead.py --config configs/toy.yaml --steps 4 --out outputs/bench/ray_overhead.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from euphonium_ray.roles import build_orm, load_codec_for, load_policy, load_prm  # noqa: E402
from euphonium_ray.config import RunConfig, load_config  # noqa: E402
from euphonium_ray.driver import prepare_inputs, resolve_paths  # noqa: E402
from euphonium_ray.sampling import prompts_for_step, seeds_for  # noqa: E402
from euphonium_ray.step import advantages, build_optimizer, learn, learning_batch, rollout, score  # noqa: E402

PHASES = ("rollout", "reward", "advantage", "learn", "broadcast", "step")


def _now(device: torch.device) -> float:
    """perf_counter once the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def in_process(cfg: RunConfig, steps: int, device: torch.device | str = "cpu",
               log: Callable[[str], None] = print) -> list[dict[str, float]]:
    """The training step with every role in this process on ``device``, sequentially (the baseline): the rollout,
    learner and (for ``optim.kl_coef`` > 0) reference copies the actors would hold, the PRM and ORM."""
    device = torch.device(device)
    dataset, _, _, latent_shape = prepare_inputs(cfg, lambda m: None)
    sampler = load_policy(cfg, "rollout", device)
    learner = load_policy(cfg, "learner", device)
    reference = load_policy(cfg, "reference", device) if cfg.optim.kl_coef > 0 else None
    prm = load_prm(cfg, device) if cfg.rgg.enabled or cfg.rewards.latent_outcome else None
    codec, orm = load_codec_for(cfg, device), build_orm(cfg, device)
    opt = build_optimizer(learner.trainable_parameters(), cfg.optim)
    latent_outcome = prm is not None and cfg.rewards.latent_outcome
    g = cfg.sampler.group_size
    out = []
    for step in range(steps):
        t0 = _now(device)
        prompts = prompts_for_step(step, len(dataset), cfg.data.prompts_per_step, cfg.data.shuffle_seed)
        cond, captions = dataset.conditioning(prompts)
        cond, captions = cond.repeat_interleave(g).to(device), [c for c in captions for _ in range(g)]
        seeds = seeds_for(cfg.seed, step, prompts, g, len(dataset))
        traj = rollout(sampler, cond, cfg, prm=prm, latent_shape=latent_shape, seeds=seeds, captions=captions,
                       weight_version=step)
        t1 = _now(device)
        with torch.no_grad():
            rewards = score(traj, lambda x, caps: orm.score(codec.decode(x), caps),
                            (lambda x, c: prm.score(x, torch.zeros(x.shape[0], device=device), c))
                            if latent_outcome else None)
        t2 = _now(device)
        adv = advantages(traj, rewards, cfg)
        t3 = _now(device)
        stats = learn(learner, opt, learning_batch(traj, adv), cfg, step=step, run_seeds=[cfg.seed],
                      reference=reference)
        t4 = _now(device)
        sampler.load_sync_state_dict({k: v.detach().clone() for k, v in learner.sync_state_dict().items()})
        t5 = _now(device)
        t = {"rollout": t1 - t0, "reward": t2 - t1, "advantage": t3 - t2, "learn": t4 - t3, "broadcast": t5 - t4,
             "step": t5 - t0, "orm_mean": float(rewards.orm.nanmean()),
             "first_ratio_min": stats.get("first_ratio_min", float("nan")),
             "first_ratio_max": stats.get("first_ratio_max", float("nan"))}
        out.append(t)
        log(f"in-process step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()))
    return out


LEARNER_KEYS = ("learn_seconds", "first_ratio_min", "first_ratio_max", "ratio_min", "ratio_max", "clip_fraction",
                "batch_fetch_seconds", "digest_seconds")
# the Ray path's own spans inside the phases: the rollout worker's weight load, sampling and packing, the driver's
# unpacking of the rollouts and hand-over of the learner's batch, and (async) the section sampling and learning share
SPANS = ("weights", "sample", "pack", "unpack", "learn_submit", "overlap_section")


def on_ray(cfg: RunConfig, steps: int, *, evaluate: bool = True, on_event: Any = None,
           **init: Any) -> list[dict[str, float]]:
    """``driver.train`` on a fresh local Ray (``init``: extra ``ray.init`` arguments, e.g. ``num_gpus``); one row
    per step: the phases' seconds, the ORM mean, the learner's ratio statistics and the weight version lag."""
    import ray

    from euphonium_ray.driver import train

    ray.init(**{"address": "local", "num_cpus": max(2, int(cfg.cluster.num_cpus or 2)), "include_dashboard": False,
                "object_store_memory": cfg.cluster.object_store_memory or 300 * 1024**2, **init})
    try:
        summary = train(cfg.model_copy(update={"steps": steps}), progress=False, evaluate=evaluate,
                        on_event=on_event)
    finally:
        ray.shutdown()
    rows = []
    for h in summary["history"]:
        s = h["scalars"]
        rows.append({p: s.get(f"time/{p}", float("nan")) for p in PHASES} | {"orm_mean": s["reward/orm_mean"]}
                    | {k: s.get(f"learner/{k}", float("nan")) for k in LEARNER_KEYS}
                    | {k: s[f"time/{k}"] for k in SPANS if f"time/{k}" in s}
                    | {"publish_seconds": s.get("weights/publish_seconds", float("nan"))}
                    | {"version_lag": s.get("weights/version_lag", float("nan"))})
    return rows


def _mean(rows: list[dict[str, float]], key: str, warmup: int) -> float:
    vals = [r[key] for r in rows[warmup:]] or [r[key] for r in rows]
    return sum(vals) / len(vals)


def plot(table: dict[str, dict[str, float]], path: Path) -> None:
    """Side-by-side bars of seconds per phase, in-process vs on Ray."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = list(table)
    xs = range(len(phases))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([x - 0.2 for x in xs], [table[p]["in_process_s"] for p in phases], 0.4, label="one process")
    ax.bar([x + 0.2 for x in xs], [table[p]["ray_s"] for p in phases], 0.4, label="local Ray (actors)")
    ax.set_xticks(list(xs), phases)
    ax.set_ylabel("seconds per step")
    ax.set_title("Training-step phases: one process vs Ray")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "toy.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1, help="leading steps left out of the means")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the in-process run (Ray actors: their CPUs)")
    p.add_argument("--no-aba", dest="aba", action="store_false",
                   help="skip the second in-process run after the Ray run (A-B-A ordering)")
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "ray_overhead.json"))
    args = p.parse_args(argv)
    base = resolve_paths(load_config(args.config, args.set, use_env=False))
    torch.set_num_threads(args.threads)
    local = in_process(base.model_copy(deep=True), args.steps)
    ray_cfg = base.model_copy(deep=True)
    ray_cfg.output.dir = str(Path(base.output.dir) / "bench-ray")
    ray_cfg.cluster.mode = "sync"
    remote = on_ray(ray_cfg, args.steps)
    # A-B-A: a second baseline after the Ray run, so load from other users of a shared machine averages out
    local_again = in_process(base.model_copy(deep=True), args.steps) if args.aba else []
    table = {}
    for ph in PHASES:
        baseline = [_mean(local, ph, args.warmup)] + ([_mean(local_again, ph, args.warmup)] if local_again else [])
        table[ph] = {"in_process_s": sum(baseline) / len(baseline), "ray_s": _mean(remote, ph, args.warmup),
                     "in_process_runs_s": baseline}
    for row in table.values():
        row["ratio"] = row["ray_s"] / row["in_process_s"] if row["in_process_s"] > 0 else float("nan")
    print(f"\n{'phase':<10} {'in-process s':>13} {'Ray s':>9} {'Ray/in-process':>15}")
    for ph, row in table.items():
        print(f"{ph:<10} {row['in_process_s']:>13.3f} {row['ray_s']:>9.3f} {row['ratio']:>15.2f}")
    same = [abs(a["orm_mean"] - b["orm_mean"]) for a, b in zip(local, remote)]
    print(f"ORM mean per step, in-process vs Ray (same seeds): max difference {max(same):.2e}")
    result = {"config": args.config, "sets": args.set, "steps": args.steps, "warmup": args.warmup,
              "threads": args.threads, "phases": table, "in_process": local + local_again, "ray": remote,
              "orm_max_abs_difference": max(same), "torch": torch.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(table, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
