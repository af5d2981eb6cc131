"""``euphonium-ray bench convergence``: does Euphonium learn faster than DanceGRPO and Flow-GRPO on the toy world?

Every method (``bench/configs/<method>.yaml``, all extending ``base.yaml``) is trained on every reward task of the
suite (``benchmark.yaml: tasks``) at each seed with the same budget, prompts per step, group size, sampling steps
and learning rate. In-process (default, ``lockstep.py``), all runs advance in lock-step — each round gives every
(task, method, seed block) one training step, in a rotating order — so load on a shared machine hits all methods
alike and a time limit (``--max-minutes``) stops every run at the same step; ``--seeds-per-unit`` trains that many
seeds of a (task, method) as one batched ensemble (the way to use a GPU). With ``--ray`` the runs go through the Ray
driver instead (``ray_runs.py``). Then the logs are analysed per task (``analysis.py``: the claim statistic of
bench/PROTOCOL.md and the older steps/seconds-to-target table) and plotted (``plots.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from euphonium_ray.bench import records
from euphonium_ray.bench.analysis import analyse, claim_statistics, markdown_table
from euphonium_ray.bench.settings import (
    BenchmarkSettings,
    check_shared_budget,
    load_method_config,
    load_settings,
    method_file,
    task_overrides,
)
from euphonium_ray.config import ConfigError, RunConfig
from euphonium_ray.files import write_atomic

DEFAULT_CONFIGS = records.REPO_ROOT / "bench" / "configs"
DEFAULT_OUT = Path("outputs") / "bench" / "convergence"
Log = Callable[[str], None]


class ConvergenceOptions(BaseModel):
    """What the command line asks for (validated)."""

    model_config = ConfigDict(extra="forbid")

    configs_dir: Path = DEFAULT_CONFIGS
    out_dir: Path = DEFAULT_OUT
    methods: list[str] | None = None
    tasks: list[str] | None = None
    seeds: int | None = Field(default=None, ge=1)
    seed_list: list[int] | None = None
    seeds_per_unit: int = Field(default=1, ge=1)
    quick: bool = False
    ray: bool = False
    world: Literal["auto", "toy", "random"] = "auto"
    threads: int | None = Field(default=None, ge=1)
    max_minutes: float | None = Field(default=None, gt=0)
    workers: int | None = Field(default=None, ge=1)
    device: str = "cpu"
    sets: list[str] = Field(default_factory=list)
    report_only: bool = False
    eval_samples_per_prompt: int | None = Field(default=None, ge=1)


Plan = dict[str, dict[str, RunConfig]]  # task -> method -> config


def resolve_plan(opts: ConvergenceOptions) -> tuple[BenchmarkSettings, Plan, list[int]]:
    """Settings (quick mode applied), each task's methods' RunConfigs (shared budget checked per task), the seeds."""
    settings = load_settings(opts.configs_dir)
    methods = opts.methods or settings.methods
    tasks = opts.tasks or list(settings.tasks)
    unknown = [t for t in tasks if t not in settings.tasks]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; benchmark.yaml defines: {', '.join(settings.tasks)}")
    files = {m: method_file(opts.configs_dir, m) for m in methods}  # unknown names fail here, naming the known ones
    if settings.baseline not in methods:
        raise ConfigError(f"--methods must include the baseline {settings.baseline!r} (the target comes from it)")
    sets = list(opts.sets)
    seeds = list(settings.seeds)
    if opts.quick:
        q = settings.quick
        settings = settings.model_copy(update={"eval_every": q.eval_every, "heldout_prompts": q.heldout_prompts,
                                               "eval_samples_per_prompt": q.eval_samples_per_prompt,
                                               "workers": q.workers})
        sets = [*q.sets, f"steps={q.steps}", *sets]
        seeds = list(q.seeds)
    if opts.seeds is not None:
        seeds = (seeds + [max(seeds) + 1 + i for i in range(opts.seeds)])[: opts.seeds]
    if opts.seed_list:
        seeds = list(opts.seed_list)
    if opts.eval_samples_per_prompt:
        settings = settings.model_copy(update={"eval_samples_per_prompt": opts.eval_samples_per_prompt})
    plan: Plan = {}
    for task in tasks:
        plan[task] = {m: load_method_config(files[m], [*task_overrides(settings.tasks[task]), *sets]) for m in methods}
        check_shared_budget(plan[task])
    return settings, plan, seeds


def _world_source(opts: ConvergenceOptions, cfg: RunConfig, log: Log) -> str:
    if opts.world != "auto":
        return opts.world
    from euphonium_ray.bench.world import COMMITTED_PRM, TOY_ASSETS

    have_model = (TOY_ASSETS / "toy-model" / "transformer" / "config.json").is_file() or \
        (Path(cfg.model.path) / "transformer" / "config.json").is_file()
    have_prm = (COMMITTED_PRM / "config.json").is_file() or (Path(cfg.rewards.prm.path) / "config.json").is_file()
    if have_model and have_prm:
        return "toy"
    log("WARNING: the trained toy model or PRM is missing; using a randomly initialised world (pipeline check only)")
    return "random"


def open_world(opts: ConvergenceOptions, settings: BenchmarkSettings, base: RunConfig, log: Log):
    """Build what is missing of the world under ``out/world`` and load it (held-out split from the settings)."""
    from euphonium_ray.bench.world import BenchWorld, prepare_world

    source = _world_source(opts, base, log)
    paths = prepare_world(base, opts.out_dir / "world", source, log)  # type: ignore[arg-type]
    world = BenchWorld(paths, base, settings.heldout_prompts, settings.heldout_seed, opts.device)
    log(f"world={source}: {len(world.train)} training prompts, {len(world.heldout)} held-out prompts "
        f"x {settings.eval_samples_per_prompt} ODE samples")
    return world


def claim_table(task: str, claim: dict[str, Any], bar: float | None) -> str:
    """The protocol's table for one task: per method the ratio of median steps to target against the baseline with
    its bootstrap interval, runs that reached the target, AUC difference and final held-out gain."""

    def num(v: float | None, fmt: str) -> str:
        import math

        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return "inf" if math.isinf(v) else format(v, fmt)

    met = "-" if bar is None else ("yes" if claim["baseline_gain"] >= bar else "NO")
    lines = [f"### task {task}: start {claim['start']:.4f}, baseline gain {claim['baseline_gain']:+.4f} "
             f"(bar +{bar if bar is not None else 0:.2f}: {met}), target {claim['target']:.4f} "
             f"(start + {claim['target_fraction']:.0%} of the gain), budget {claim['budget_steps']} steps", "",
             "| method | median steps to target | reached | ratio vs baseline [95% CI] | AUC − baseline [95% CI] "
             "| final held-out gain |", "|---|---|---|---|---|---|"]
    for name, m in claim["methods"].items():
        lo, hi = m["ratio_ci"]
        alo, ahi = m["auc_minus_baseline_ci"]
        fin = m["final_heldout_gain"]
        lines.append(f"| {name} | {num(m['median_steps'], '.1f')} | {m['reached']}/{len(m['seeds'])} "
                     f"| {num(m['ratio_vs_baseline'], '.2f')}x [{num(lo, '.2f')}, {num(hi, '.2f')}] "
                     f"| {num(m['auc_minus_baseline'], '+.4f')} [{num(alo, '+.4f')}, {num(ahi, '+.4f')}] "
                     f"| {fin['mean']:+.4f} ± {fin['std']:.4f} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, info: dict[str, Any], log: Log) -> dict[str, Any]:
    """Analyse the logs under ``out`` per task and write convergence.json / .md and the PNG plots."""
    from euphonium_ray.bench.plots import plot_convergence

    logs = records.load_logs(out)
    order = {m: i for i, m in enumerate(info.get("methods", []))}
    logs.sort(key=lambda lg: (lg.task, order.get(lg.method, len(order)), lg.method, lg.seed))
    st = info["settings"]
    claim_cfg = st.get("claim", {})
    tasks: dict[str, Any] = {}
    text = []
    plots: list[Path] = []
    for task in sorted({lg.task for lg in logs}):
        task_logs = [lg for lg in logs if lg.task == task]
        result = analyse(task_logs, st["baseline"], st["candidate"], st["smoothing"])
        claim = claim_statistics(task_logs, st["baseline"], claim_cfg.get("target_fraction", 0.8),
                                 claim_cfg.get("bootstrap", 10000), claim_cfg.get("confidence", 0.95),
                                 claim_cfg.get("bootstrap_seed", 0))
        bar = st.get("tasks", {}).get(task, {}).get("bar")
        plots += plot_convergence(task_logs, out, st["smoothing"], prefix=f"{task}_",
                                  title=f"task {task} ({info.get('mode', '?')}, world={info.get('world', {}).get('source', '?')})",
                                  target=claim["target"])
        curves = {f"{lg.method}/seed-{lg.seed}": {
            "train_reward": [s["train_reward"] for s in lg.steps[: result["budget_steps"]]],
            "heldout": [[e["step"], e["heldout_reward"]] for e in lg.evals if e["step"] <= result["budget_steps"]],
        } for lg in task_logs}
        tasks[task] = {**result, "claim": claim, "baseline_met_bar": None if bar is None else claim["baseline_gain"] >= bar,
                       "curves": curves}
        text.append(claim_table(task, claim, bar) + "\n" + markdown_table(result))
    report = {**info, "tasks": tasks, "plots": [str(p) for p in plots]}
    records.write_json_atomic(out / records.REPORT_JSON, report)
    write_atomic(out / records.REPORT_MD, "\n".join(text))
    log("\n".join(text))
    log(f"report: {out / records.REPORT_JSON}; plots: {', '.join(str(p) for p in plots)}")
    return report


def run_benchmark(opts: ConvergenceOptions, log: Log = print) -> dict[str, Any]:
    """Plan, run (in-process or on Ray) and report; returns the report dict (what convergence.json holds)."""
    out = opts.out_dir
    if opts.report_only:
        info_path = out / records.RUN_INFO
        if not info_path.is_file():
            raise records.RecordError(f"{info_path} not found: is {out} a benchmark output folder?")
        return write_report(out, json.loads(info_path.read_text()), log)
    settings, plan, seeds = resolve_plan(opts)
    torch.set_num_threads(opts.threads or settings.threads)
    out.mkdir(parents=True, exist_ok=True)
    for task, configs in plan.items():
        (out / "configs" / task).mkdir(parents=True, exist_ok=True)
        for method, cfg in configs.items():
            cfg.save(out / "configs" / task / f"{method}.yaml")
    first = next(iter(plan.values()))
    info: dict[str, Any] = {
        "benchmark": "convergence",
        "mode": "ray" if opts.ray else "in-process",
        "quick": opts.quick,
        "tasks": list(plan),
        "methods": list(first),
        "seeds": seeds,
        "seeds_per_unit": opts.seeds_per_unit,
        "settings": settings.model_dump(mode="json"),
        "overrides": opts.sets,
        "git": records.git_state(),
        "config_hash": {task: records.config_hashes(configs) for task, configs in plan.items()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    records.write_json_atomic(out / records.RUN_INFO, info)
    world = open_world(opts, settings, next(iter(first.values())), log)
    info["world"] = {"source": world.paths.source, **world.paths.provenance,
                     "train_prompts": len(world.train), "heldout_prompts": [world.captions[i] for i in world.heldout]}
    records.write_json_atomic(out / records.RUN_INFO, info)
    if opts.ray:
        from euphonium_ray.bench.ray_runs import run_on_ray

        info.update(run_on_ray(world, settings, plan, seeds, out, log))
    else:
        from euphonium_ray.bench.lockstep import run_in_process

        info.update(run_in_process(world.paths, settings, plan, seeds, out, device=opts.device,
                                   threads=opts.threads or settings.threads, workers=opts.workers or settings.workers,
                                   seeds_per_unit=opts.seeds_per_unit, max_minutes=opts.max_minutes, log=log))
    records.write_json_atomic(out / records.RUN_INFO, info)
    return write_report(out, info, log)


def parse_args(argv: list[str]) -> ConvergenceOptions:
    p = argparse.ArgumentParser(prog="euphonium-ray bench convergence", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-sized budgets (benchmark.yaml: quick)")
    p.add_argument("--ray", action="store_true", help="run through the Ray driver on a local Ray (default: in-process)")
    p.add_argument("--seeds", type=int, help="number of seeds per method (default: benchmark.yaml)")
    p.add_argument("--seed-list", type=int, nargs="+", help="exactly these seeds (e.g. the protocol's final seeds)")
    p.add_argument("--tasks", nargs="+", help="reward tasks to run (default: all in benchmark.yaml)")
    p.add_argument("--eval-samples-per-prompt", type=int,
                   help="fixed-noise ODE samples per held-out prompt (default: benchmark.yaml)")
    p.add_argument("--seeds-per-unit", type=int, default=1,
                   help="seeds of one (task, method) trained together as one batched ensemble (use on a GPU)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--methods", nargs="+", help="methods to run (default: all in benchmark.yaml)")
    p.add_argument("--configs", type=Path, default=DEFAULT_CONFIGS, help="folder of base/method/benchmark YAMLs")
    p.add_argument("--world", choices=("auto", "toy", "random"), default="auto",
                   help="toy: committed model + trained PRM; random: random init (pipeline check); auto: toy if present")
    p.add_argument("--threads", type=int, help="torch threads (default: benchmark.yaml)")
    p.add_argument("--max-minutes", type=float, help="stop every run at the same step once this much time has passed")
    p.add_argument("--workers", type=int,
                   help="in-process: deal the runs over this many processes (default: benchmark.yaml)")
    p.add_argument("--device", default="cpu", help="torch device of the in-process runner (cpu, cuda)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for EVERY method (the budget stays shared)")
    p.add_argument("--report-only", action="store_true", help="re-analyse and re-plot the logs already in --out")
    a = p.parse_args(argv)
    return ConvergenceOptions(configs_dir=a.configs, out_dir=a.out, methods=a.methods, tasks=a.tasks, seeds=a.seeds,
                              seed_list=a.seed_list, seeds_per_unit=a.seeds_per_unit, quick=a.quick,
                              ray=a.ray, world=a.world, threads=a.threads, max_minutes=a.max_minutes, device=a.device,
                              workers=a.workers, sets=a.sets, report_only=a.report_only,
                              eval_samples_per_prompt=a.eval_samples_per_prompt)


def main(argv: list[str]) -> int:
    try:
        opts = parse_args(argv)
        run_benchmark(opts)
    except (ConfigError, records.RecordError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
