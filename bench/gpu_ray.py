"""The toy world on one GPU: every role through Ray on fractional shares of the one GPU vs the same library functions
in one process on that GPU, and sync vs async (one-step-off) rollouts, side by side in one run.

Three runs of the same steps, seeds and batch: ``in_process`` (``bench/ray_overhead.py``: sampling with RGG,
decode + ORM, latent PRM, advantages, GRPO update, weight copy, all in this process on ``--device``), ``ray_sync``
(``euphonium-ray train``'s loop, ``driver.train``, on a local Ray: rollout worker, PRM pool, ORM pool and the Ray Train
learner each on a quarter of the GPU, weights through the object store) and ``ray_async`` (the same with
``cluster.mode: async``: the rollouts of step k+1 run while the learner learns step k, with weights one version old).
The first ``--warmup`` steps and the last (it writes the checkpoint) are left out of the means.

Reports the seconds per phase and the Ray/in-process ratio, the step time sync vs async and the measured overlap,
and the importance ratio of each step's first update against the clip range (1 ± ``optim.clip_range``). Writes
``toy_1gpu.json``, ``toy_1gpu.png``, ``toy_1gpu.md`` (the short README) and ``toy_1gpu.log`` (every stage with
timestamps, as it happens; a watchdog logs the stacks and Ray's free resources when nothing moves) into ``--out``.

    python3 bench/gpu_ray.py --device cuda --out $OUT                            # 16 prompts x 8, 10 steps
    sh scripts/loopback.sh .venv/bin/python bench/gpu_ray.py --device cpu --tiny --steps 4 --out /tmp/gpu_ray
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only; Ray 2.60 enables token auth when unset
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from bench.ray_overhead import PHASES, SPANS, in_process, on_ray  # noqa: E402
from euphonium_ray.config import RunConfig, load_config  # noqa: E402
from euphonium_ray.driver import resolve_paths  # noqa: E402
from euphonium_ray.stage_log import StageLog  # noqa: E402

ROLES = ("rollout", "prm", "orm", "learner")
NAME = "toy_1gpu"


# ------------------------------------------------------------------------------------------------ config
def bench_config(args: argparse.Namespace) -> RunConfig:
    """configs/toy.yaml at the bench's batch: one optimizer update per step over all videos (as the toy recipe),
    every role on ``--share`` of the GPU (none on CPU), no evaluation, checkpoints or GIFs inside the steps."""
    b = args.prompts * args.group
    cuda = args.device == "cuda"
    share = args.share if cuda else 0.0
    sets = [f"data.prompts_per_step={args.prompts}", f"sampler.group_size={args.group}", f"optim.grad_accum={b}",
            f"cluster.num_cpus={args.num_cpus}", f"cluster.rollout_cpus={args.role_cpus}",
            f"cluster.learner_cpus={args.role_cpus}", "cluster.num_rollout_workers=1", "cluster.num_learners=1",
            "output.save_every=100000", "output.sample_every=100000", "output.eval_every=0",
            f"output.dir={Path(args.work_dir).resolve()}"]
    sets += [f"cluster.{role}_gpus={share}" for role in ROLES]
    if args.tiny:  # CPU-sized: fewer SDE steps, RGG from step 5 (as the Ray tests)
        sets += ["sampler.num_steps=8", "rgg.start=5"]
    return resolve_paths(load_config(args.config, sets + list(args.set), use_env=False))


def for_mode(cfg: RunConfig, mode: str, work: Path) -> RunConfig:
    out = cfg.model_copy(deep=True)
    out.cluster.mode = mode
    out.output.dir = str(work / f"ray_{mode}")
    return out


def object_store_bytes(traj_bytes: int = 0, steps: int = 0) -> int:
    """2 GiB, or room for every step's rollouts when that is more (the learner's hub keeps each step's batch, which
    names the rollouts, until the next checkpoint: none inside the bench's steps), in /dev/shm when it has room for
    it; else half of what it has (at least 512 MiB; Ray then puts the store in its temp dir, slower, and says so)."""
    st = os.statvfs("/dev/shm")
    free = st.f_bavail * st.f_frsize
    want = max(2 * 1024**3, (steps + 3) * traj_bytes)
    return want if free >= 1.1 * want else max(512 * 1024**2, free // 2)


def trajectory_bytes(cfg: RunConfig, videos: int) -> int:
    """The bytes of a step's latent paths (what crosses the object store): videos x (SDE steps + 1) latents."""
    from euphonium_ray.models.codecs import load_codec

    shape = load_codec(Path(cfg.model.path) / "vae").latent_shape(cfg.data.num_frames, cfg.data.height,
                                                                    cfg.data.width)
    return videos * (cfg.sampler.num_steps + 1) * math.prod(int(s) for s in shape) * 4


# ------------------------------------------------------------------------------------------------ analysis
def mean_of(rows: list[dict[str, float]], key: str, lo: int, hi: int) -> float:
    vals = [r[key] for r in rows[lo:hi] if key in r and math.isfinite(r[key])]
    return sum(vals) / len(vals) if vals else float("nan")


def phase_table(runs: dict[str, list[dict[str, float]]], lo: int, hi: int) -> dict[str, dict[str, float]]:
    table = {}
    for ph in PHASES:
        row = {name: mean_of(rows, ph, lo, hi) for name, rows in runs.items()}
        base = row.get("in_process", float("nan"))
        row["ray_sync_over_in_process"] = row.get("ray_sync", float("nan")) / base if base > 0 else float("nan")
        table[ph] = row
    return table


def overlap(rows: list[dict[str, float]], lo: int, hi: int) -> dict[str, float]:
    """In async step k the driver starts sampling and scoring step k+1, sends step k to the learner, then waits for
    the learner: that section (``overlap_section[k]``, from the start of sampling; ``learn[k]`` where a run did not
    record it) holds ``rollout[k+1] + reward[k+1]`` seconds of sampling and ``learn_seconds[k]`` of learner compute;
    what it is shorter than their sum ran at the same time. (Sampling that outlasts the section, the learner being
    the shorter side, leaves the learner's whole time overlapped: both started at the section's start.)"""
    per_step = []
    for k in range(lo, min(hi, len(rows) - 1)):
        sampling = rows[k + 1]["rollout"] + rows[k + 1]["reward"]
        learning = rows[k]["learn_seconds"]
        section = rows[k].get("overlap_section", rows[k]["learn"])
        hidden = max(0.0, min(sampling + learning - section, sampling, learning))
        per_step.append({"step": k, "section_s": section, "sampling_s": sampling, "learner_s": learning,
                         "overlap_s": hidden, "overlap_fraction": hidden / min(sampling, learning)})
    avg = {key: sum(p[key] for p in per_step) / len(per_step) if per_step else float("nan")
           for key in ("section_s", "sampling_s", "learner_s", "overlap_s", "overlap_fraction")}
    return {**avg, "per_step": per_step}


def ratio_check(rows: list[dict[str, float]], clip: float) -> dict[str, Any]:
    """Each step's first optimizer update: the importance ratio's extremes, and whether they stay in 1 ± clip."""
    lows = [r["first_ratio_min"] for r in rows if math.isfinite(r.get("first_ratio_min", float("nan")))]
    highs = [r["first_ratio_max"] for r in rows if math.isfinite(r.get("first_ratio_max", float("nan")))]
    inside = [lo >= 1 - clip and hi <= 1 + clip for lo, hi in zip(lows, highs)]
    return {"clip_range": clip, "first_ratio_min": min(lows, default=float("nan")),
            "first_ratio_max": max(highs, default=float("nan")),
            "max_abs_deviation": max([abs(v - 1) for v in lows + highs], default=float("nan")),
            "steps_within_clip": sum(inside), "steps": len(inside), "all_within_clip": all(inside) and bool(inside)}


# ------------------------------------------------------------------------------------------------ output
def plot(table: dict[str, dict[str, float]], runs: dict[str, list[dict[str, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("in_process", "ray_sync", "ray_async") if n in runs]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(PHASES))]
        ax.bar(xs, [table[ph][name] for ph in PHASES], width, label=name.replace("_", " "))
    ax.set_xticks(range(len(PHASES)), PHASES)
    ax.set_ylabel("seconds per step (mean)")
    ax.set_title("phases")
    ax.legend()
    for name in names:
        ax2.plot([r["step"] for r in runs[name]], marker="o", label=name.replace("_", " "))
    ax2.set_xticks(range(max(len(rows) for rows in runs.values())))
    ax2.set_xlabel("step")
    ax2.set_ylabel("step seconds")
    ax2.set_title("every step (warm-up included)")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    t, s = result["phases"], result["setup"]
    names = [n for n in ("in_process", "ray_sync", "ray_async") if n in result["runs"]]
    where = f"every role on {s['share']} of the GPU" if s["share"] else "every role on the CPU"
    lines = [f"# The toy world on one {s['device_name']}: Ray vs one process, sync vs async",
             "", "Generated by `bench/gpu_ray.py`. Command:", "", f"    {result['command']}", "",
             f"{s['prompts']} prompts x {s['group']} videos = {s['batch']} videos per step, {s['sde_steps']} SDE steps "
             f"(RGG from step {s['rgg_start']}), one AdamW update per step; {where} (rollout, PRM pool, ORM pool, "
             f"learner under Ray Train), weight sync `{s['weight_sync']}`. Steps "
             f"{s['measured'][0]}..{s['measured'][1] - 1} of {s['steps']} averaged (warm-up and the checkpointing "
             f"last step left out). torch {s['torch']}, Ray {s['ray']}, {s['cpus']} CPUs.", "",
             "| phase | " + " | ".join(n.replace("_", " ") + " (s)" for n in names) + " | Ray sync / one process |",
             "|---" * (len(names) + 2) + "|"]
    for ph in PHASES:
        row = t[ph]
        cells = " | ".join(f"{row[n]:.3f}" for n in names)
        lines.append(f"| {ph} | {cells} | {row['ray_sync_over_in_process']:.2f} |")
    a = result.get("async")
    if a:
        lines += ["", f"Async: step {a['step_s']:.3f} s vs sync {a['sync_step_s']:.3f} s "
                      f"({a['speedup']:.2f}x). In the overlapped section ({a['overlap']['section_s']:.3f} s) sampling "
                      f"step k+1 took {a['overlap']['sampling_s']:.3f} s and learning step k "
                      f"{a['overlap']['learner_s']:.3f} s: {a['overlap']['overlap_s']:.3f} s ran at the same time "
                      f"({100 * a['overlap']['overlap_fraction']:.0f}% of the shorter)."]
    for name, row in result.get("spans", {}).items():
        lines += ["", f"Spans of `{name}` inside the phases (s): " + ", ".join(f"{k} {v:.3f}" for k, v in row.items())]
    lines += ["", "Importance ratio of each step's first update (clip range 1 ± "
              f"{result['setup']['clip_range']}):", "", "| run | min | max | steps within clip |", "|---|---|---|---|"]
    for name, r in result["ratios"].items():
        lines.append(f"| {name.replace('_', ' ')} | {r['first_ratio_min']:.6f} | {r['first_ratio_max']:.6f} | "
                     f"{r['steps_within_clip']}/{r['steps']} |")
    lines += ["", f"Same seeds, same samples: ORM mean per step, one process vs Ray sync, max difference "
                  f"{result['orm_max_abs_difference']:.2e}.", ""]
    lines += [f"Run `{name}` failed: {err}" for name, err in result["errors"].items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--config", default=str(ROOT / "configs" / "toy.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (default 16 on cuda, 2 with --tiny)")
    p.add_argument("--group", type=int, default=None, help="videos per prompt (default 8 on cuda, 4 with --tiny)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="leading steps left out of the means")
    p.add_argument("--share", type=float, default=0.25, help="GPU share of each of the four roles")
    p.add_argument("--num-cpus", type=int, default=None, help="Ray's CPUs (default: min(8, this machine's))")
    p.add_argument("--role-cpus", type=float, default=None, help="CPUs of the rollout worker and the learner")
    p.add_argument("--modes", default="in_process,sync,async", help="which runs, comma-separated")
    p.add_argument("--tiny", action="store_true", help="CPU test sizes: 8 SDE steps, 2 prompts x 4")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "outputs" / "bench" / "gpu_ray"))
    p.add_argument("--work-dir", default="/tmp/euphonium_gpu_ray", help="run folders (checkpoints, TensorBoard)")
    p.add_argument("--ray-temp-dir", default="/tmp/ray_gpu_ray", help="Ray's temp dir (short: socket paths)")
    p.add_argument("--stall-s", type=float, default=180.0, help="log stacks and Ray's resources after this quiet")
    p.add_argument("--deadline-s", type=float, default=570.0, help="stacks into the log and exit past this")
    args = p.parse_args(argv)
    args.prompts = args.prompts or (2 if args.tiny else 16)
    args.group = args.group or (4 if args.tiny else 8)
    args.num_cpus = args.num_cpus or min(8, os.cpu_count() or 2)
    args.role_cpus = args.role_cpus or (2.0 if args.num_cpus >= 8 else 0.5)
    if args.steps < args.warmup + 2:
        p.error(f"--steps {args.steps} leaves no measured step after --warmup {args.warmup} and the last step")
    out, work = Path(args.out), Path(args.work_dir)
    log = StageLog(out / f"{NAME}.log")

    def ray_resources() -> None:
        import ray

        if ray.is_initialized():
            log(f"Ray resources free {ray.available_resources()} of {ray.cluster_resources()}")

    log.watch(args.stall_s, args.deadline_s, on_stall=ray_resources)
    log("bench/gpu_ray.py " + " ".join(sys.argv[1:]))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    with log.stage("setup"):
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch sees no CUDA device")
        cfg = bench_config(args)
        import ray

        device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
        setup = {"device": args.device, "device_name": device_name, "prompts": args.prompts, "group": args.group,
                 "batch": args.prompts * args.group, "sde_steps": cfg.sampler.num_steps, "rgg_start": cfg.rgg.start,
                 "share": args.share if args.device == "cuda" else 0.0, "steps": args.steps, "warmup": args.warmup,
                 "measured": [args.warmup, args.steps - 1], "clip_range": cfg.optim.clip_range,
                 "weight_sync": cfg.cluster.weight_sync_backend(), "torch": torch.__version__, "ray": ray.__version__,
                 "cpus": os.cpu_count(), "ray_num_cpus": args.num_cpus}
        setup["trajectory_bytes"] = trajectory_bytes(cfg, setup["batch"]) if Path(cfg.model.path).is_dir() else 0
        setup["object_store_bytes"] = object_store_bytes(setup["trajectory_bytes"], args.steps)
        log(f"batch: {args.prompts} prompts x {args.group} videos = {setup['batch']} videos per step, "
            f"{cfg.sampler.num_steps} SDE steps; a step's latent paths {setup['trajectory_bytes'] / 1e6:.0f} MB")
        log(f"setup {json.dumps(setup)}")
    init: dict[str, Any] = {"num_cpus": args.num_cpus, "object_store_memory": setup["object_store_bytes"],
                            "_temp_dir": args.ray_temp_dir, "_node_ip_address": "127.0.0.1"}
    if args.device == "cuda":
        init["num_gpus"] = 1

    def on_event(name: str, step: int, system: Any, record: dict[str, Any] | None) -> None:
        if name == "step_end" and record is not None:
            s = record["scalars"]
            log(f"  step {step}: " + ", ".join(f"{ph} {s.get(f'time/{ph}', float('nan')):.3f}" for ph in PHASES)
                + f", first ratio [{s.get('learner/first_ratio_min', float('nan')):.6f}, "
                  f"{s.get('learner/first_ratio_max', float('nan')):.6f}], version lag {s['weights/version_lag']:.0f}")

    runs: dict[str, list[dict[str, float]]] = {}
    errors: dict[str, str] = {}

    def save_partial() -> None:  # what a run killed at its deadline still leaves
        (out / f"{NAME}.json").write_text(json.dumps({"partial": True, "setup": setup, "runs": runs,
                                                      "errors": errors}, indent=2, default=float) + "\n")

    def attempt(name: str, run: Any) -> None:
        try:
            with log.stage(name):
                runs[name.split(" ")[0]] = run()
        except Exception as exc:  # noqa: BLE001 - the other runs still go ahead; the exit status says it
            errors[name.split(" ")[0]] = f"{type(exc).__name__}: {exc}"
        save_partial()

    if "in_process" in modes:
        torch.set_num_threads(max(1, int(args.role_cpus)))  # as many as each Ray actor gets (set_threads)
        attempt(f"in_process on {args.device} ({torch.get_num_threads()} torch threads)",
                lambda: in_process(cfg.model_copy(deep=True), args.steps, args.device, log=log))
        if args.device == "cuda":  # the Ray runs' actors need the GPU's memory more than this process's cache
            torch.cuda.empty_cache()
    for mode in ("sync", "async"):
        if mode in modes:
            log(f"ray.init({init})")
            attempt(f"ray_{mode}", lambda mode=mode: on_ray(for_mode(cfg, mode, work), args.steps, evaluate=False,
                                                             on_event=on_event, **init))
    if not runs:
        log(f"no run finished: {errors}")
        return 1
    for name, rows in runs.items():
        for i, r in enumerate(rows):
            r["step_index"] = i
    lo, hi = args.warmup, args.steps - 1
    table = phase_table(runs, lo, hi)
    result: dict[str, Any] = {"command": "python3 bench/gpu_ray.py " + " ".join(sys.argv[1:]), "setup": setup,
                              "phases": table, "runs": runs, "errors": errors,
                              "ratios": {n: ratio_check(r[lo:hi], cfg.optim.clip_range) for n, r in runs.items()}}
    if "in_process" in runs and "ray_sync" in runs:
        diffs = [abs(a["orm_mean"] - b["orm_mean"]) for a, b in zip(runs["in_process"], runs["ray_sync"])]
        result["orm_max_abs_difference"] = max(diffs)
    else:
        result["orm_max_abs_difference"] = float("nan")
    if "ray_async" in runs and "ray_sync" in runs:
        step_async, step_sync = table["step"]["ray_async"], table["step"]["ray_sync"]
        result["async"] = {"step_s": step_async, "sync_step_s": step_sync, "speedup": step_sync / step_async,
                           "overlap": overlap(runs["ray_async"], lo, hi)}
    log(f"{'phase':<10} " + " ".join(f"{n:>11}" for n in runs) + f" {'Ray/in-process':>15}")
    for ph, row in table.items():
        log(f"{ph:<10} " + " ".join(f"{row[n]:>11.3f}" for n in runs) + f" {row['ray_sync_over_in_process']:>15.2f}")
    spans = ("learn_seconds", "batch_fetch_seconds", "digest_seconds", "publish_seconds") + SPANS
    result["spans"] = {name: {k: mean_of(rows, k, lo, hi) for k in spans if any(k in r for r in rows)}
                       for name, rows in runs.items() if name != "in_process"}
    for name, row in result["spans"].items():
        log(f"spans {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
    for name, r in result["ratios"].items():
        log(f"first-update ratio {name}: [{r['first_ratio_min']:.6f}, {r['first_ratio_max']:.6f}], "
            f"{r['steps_within_clip']}/{r['steps']} steps within 1 ± {r['clip_range']}")
    if "async" in result:
        a = result["async"]
        log(f"async step {a['step_s']:.3f}s vs sync {a['sync_step_s']:.3f}s ({a['speedup']:.2f}x); overlap "
            f"{a['overlap']['overlap_s']:.3f}s ({100 * a['overlap']['overlap_fraction']:.0f}% of the shorter side)")
    log(f"ORM mean per step, one process vs Ray sync: max difference {result['orm_max_abs_difference']:.2e}")
    with log.stage("write"):
        (out / f"{NAME}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
        (out / f"{NAME}.md").write_text(markdown(result))
        plot(table, runs, out / f"{NAME}.png", f"toy world, {setup['batch']} videos/step, {device_name}")
        log(f"wrote {out / NAME}.json, .md, .png" + (f"; runs that failed: {errors}" if errors else ""))
    log.close()
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
