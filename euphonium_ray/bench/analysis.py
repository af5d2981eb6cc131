"""From per-run logs to the benchmark's answers: steps and seconds to the baseline's final reward, final held-out
reward, ratios. Pure functions over plain records, so they are tested on hand-made curves.

Conventions: a training-rollout record at step t holds the ORM rewards of rollouts drawn by the policy after t
updates, and its "seconds" are the run's training seconds before that step began (so t updates cost that long);
an evaluation record at step t is the held-out reward of the policy after t updates. The training reward is
smoothed by a trailing moving average (window ``smoothing``) before thresholds are crossed. All runs are cut to
the common budget T = the fewest steps any run completed, so a budget stopped early is the same for every method.
The target is the baseline's reward at the end of that budget, averaged over its seeds.
``step0_reward_minus_baseline`` pairs each run's first rollouts with the baseline's at the same seed: same prompts,
same per-sample noise seeds, same initial policy, so the difference is the immediate effect of the method's sampler
(guidance, or another noise schedule) on the reward of the rollouts, before any learning.
``train_reward_minus_baseline_second_half`` is the mean over the second half of the budget of the per-step
difference to the baseline at the same seed (same prompts each step), which removes the prompt-difficulty swings
that dominate the raw per-step curves. A run that never reaches
it is censored: it counts as slower than any run that did, and a method whose median run is censored has no
median ("not reached").
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["RunLog", "moving_average", "first_crossing", "censored_median", "analyse"]


@dataclass
class RunLog:
    """One (method, seed) run: its per-step training records and its held-out evaluations."""

    method: str
    seed: int
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    task: str = "caption"

    def cut(self, budget: int) -> "RunLog":
        return RunLog(self.method, self.seed, self.steps[:budget], [e for e in self.evals if e["step"] <= budget],
                      self.task)

    def train_curve(self, window: int) -> list[float]:
        return moving_average([float(s["train_reward"]) for s in self.steps], window)

    def seconds_before(self, key: str = "cum_seconds") -> list[float]:
        """Training seconds spent before each step began (``cum_seconds`` includes the step's own time)."""
        per = "seconds" if key == "cum_seconds" else "cpu_seconds"
        return [float(s[key]) - float(s[per]) for s in self.steps]

    @property
    def has_cpu_time(self) -> bool:
        """In-process runs measure process CPU seconds too; Ray runs (work spread over actors) do not."""
        return bool(self.steps) and all("cum_cpu_seconds" in s for s in self.steps)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    if window < 1:
        raise ValueError(f"smoothing window must be >= 1, got {window}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def first_crossing(values: Sequence[float], target: float) -> int | None:
    """Index of the first value >= target, or None."""
    return next((i for i, v in enumerate(values) if v >= target), None)


def censored_median(values: Sequence[float | None]) -> float | None:
    """Median with None (never reached) ranked above every number; None when the median itself is censored."""
    if not values:
        return None
    ranked = sorted(values, key=lambda v: math.inf if v is None else v)
    n = len(ranked)
    mid = ranked[(n - 1) // 2 : n // 2 + 1]
    if any(v is None for v in mid):
        return None
    return float(sum(mid) / len(mid))  # type: ignore[arg-type]


def _spread(values: Sequence[float | None]) -> dict[str, Any]:
    reached = [v for v in values if v is not None]
    return {
        "median": censored_median(values),
        "min": min(reached) if reached else None,
        "max": max(reached) if reached else None,
        "per_seed": list(values),
        "reached": len(reached),
        "runs": len(values),
    }


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def _ratio(base: float | None, other: float | None) -> float | None:
    """How many times fewer steps/seconds ``other`` needs than ``base``; None when either is not reached or
    ``other`` is at the target from the start (0: no finite ratio)."""
    if base is None or other is None or other == 0:
        return None
    return base / other


def analyse(logs: list[RunLog], baseline: str, candidate: str, smoothing: int) -> dict[str, Any]:
    """Everything the report states, as plain JSON-ready data (see the module docstring for the conventions)."""
    by_method: dict[str, list[RunLog]] = {}
    for log in logs:
        by_method.setdefault(log.method, []).append(log)
    if baseline not in by_method:
        raise ValueError(f"baseline method {baseline!r} has no runs (have: {', '.join(by_method)})")
    budget = min(len(log.steps) for log in logs)
    if budget < 1:
        empty = [f"{log.method}/seed {log.seed}" for log in logs if not log.steps]
        raise ValueError(f"runs with no completed training step: {', '.join(empty)}")
    cut = {m: sorted((log.cut(budget) for log in runs), key=lambda r: r.seed) for m, runs in by_method.items()}
    base_runs = cut[baseline]
    target_train = statistics.fmean(r.train_curve(smoothing)[-1] for r in base_runs)
    final_evals = [r.evals[-1] for r in base_runs if r.evals and r.evals[-1]["step"] == budget]
    target_heldout = statistics.fmean(e["heldout_reward"] for e in final_evals) if final_evals else None

    methods: dict[str, Any] = {}
    for method, runs in cut.items():
        steps_train, secs_train, cpu_train = [], [], []
        steps_held, secs_held = [], []
        for r in runs:
            idx = first_crossing(r.train_curve(smoothing), target_train)
            steps_train.append(None if idx is None else float(r.steps[idx]["step"]))
            secs_train.append(None if idx is None else r.seconds_before()[idx])
            if r.has_cpu_time:
                cpu_train.append(None if idx is None else r.seconds_before("cum_cpu_seconds")[idx])
            if target_heldout is not None:
                j = first_crossing([e["heldout_reward"] for e in r.evals], target_heldout)
                steps_held.append(None if j is None else float(r.evals[j]["step"]))
                secs_held.append(None if j is None else float(r.evals[j]["cum_seconds"]))
        finals = [r.evals[-1]["heldout_reward"] for r in runs if r.evals and r.evals[-1]["step"] == budget]
        initial = [r.evals[0]["heldout_reward"] for r in runs if r.evals and r.evals[0]["step"] == 0]
        methods[method] = {
            "seeds": [r.seed for r in runs],
            "steps_to_target_train": _spread(steps_train),
            "seconds_to_target_train": _spread(secs_train),
            "cpu_seconds_to_target_train": _spread(cpu_train) if cpu_train else None,
            "steps_to_target_heldout": _spread(steps_held) if target_heldout is not None else None,
            "seconds_to_target_heldout": _spread(secs_held) if target_heldout is not None else None,
            "final_train_reward_smoothed": _mean_std([r.train_curve(smoothing)[-1] for r in runs]),
            "final_heldout_reward": _mean_std(finals) if finals else None,
            "initial_heldout_reward": _mean_std(initial) if initial else None,
            "guidance_to_noise": _mean_std(g2n) if (g2n := [float(s["guidance_to_noise"]) for r in runs
                                                             for s in r.steps if "guidance_to_noise" in s]) else None,
            "seconds_per_step": _mean_std([r.steps[-1]["cum_seconds"] / len(r.steps) for r in runs]),
            "cpu_seconds_per_step": _mean_std([r.steps[-1]["cum_cpu_seconds"] / len(r.steps) for r in runs])
            if all(r.has_cpu_time for r in runs) else None,
        }
    base_first = {r.seed: float(r.steps[0]["train_reward"]) for r in base_runs}
    base_curve = {r.seed: [float(x["train_reward"]) for x in r.steps] for r in base_runs}
    half = budget // 2
    for method, runs in cut.items():  # same prompts per step: a paired gain, free of prompt difficulty
        gains = [statistics.fmean(float(x["train_reward"]) - base_curve[r.seed][t] for t, x in enumerate(r.steps)
                                  if t >= half) for r in runs if r.seed in base_curve]
        methods[method]["train_reward_minus_baseline_second_half"] = _mean_std(gains) if gains else None
    for method, runs in cut.items():  # same prompts, same per-sample seeds, same initial policy at step 0
        diffs = [float(r.steps[0]["train_reward"]) - base_first[r.seed] for r in runs if r.seed in base_first]
        methods[method]["step0_reward_minus_baseline"] = _mean_std(diffs) if diffs else None
    base = methods[baseline]
    for method, m in methods.items():
        m["speedup_vs_baseline"] = {
            "steps_train": _ratio(base["steps_to_target_train"]["median"], m["steps_to_target_train"]["median"]),
            "seconds_train": _ratio(base["seconds_to_target_train"]["median"], m["seconds_to_target_train"]["median"]),
            "steps_heldout": _ratio((base["steps_to_target_heldout"] or {}).get("median"),
                                    (m["steps_to_target_heldout"] or {}).get("median")),
            "seconds_heldout": _ratio((base["seconds_to_target_heldout"] or {}).get("median"),
                                      (m["seconds_to_target_heldout"] or {}).get("median")),
        }
    base_initial_train = statistics.fmean(float(r.steps[0]["train_reward"]) for r in base_runs)
    base_initial_held = (base["initial_heldout_reward"] or {}).get("mean")
    return {
        "budget_steps": budget,
        # a target the baseline reached without improving is vacuous (every run "reaches" it at step 0)
        "baseline_improved_train": target_train > base_initial_train,
        "baseline_improved_heldout": None if target_heldout is None or base_initial_held is None
        else target_heldout > base_initial_held,
        "smoothing": smoothing,
        "baseline": baseline,
        "candidate": candidate,
        "target_train_reward": target_train,
        "target_heldout_reward": target_heldout,
        "methods": methods,
        "candidate_vs_baseline": methods.get(candidate, {}).get("speedup_vs_baseline"),
    }


def markdown_table(result: dict[str, Any]) -> str:
    """The (a)-(c) table: steps and seconds to the baseline's final reward (median [min-max], reached/runs),
    the speed-up against the baseline, and the final held-out reward."""

    def spread(s: dict[str, Any] | None, fmt: str) -> str:
        if not s:
            return "-"
        med = "not reached" if s["median"] is None else format(s["median"], fmt)
        rng = "" if s["min"] is None else f" [{format(s['min'], fmt)}-{format(s['max'], fmt)}]"
        return f"{med}{rng} ({s['reached']}/{s['runs']})"

    def ratio(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    lines = [
        f"budget {result['budget_steps']} steps; target = {result['baseline']}'s final reward: training "
        f"{result['target_train_reward']:.4f} (smoothed over {result['smoothing']} steps), held-out "
        + ("-" if result["target_heldout_reward"] is None else f"{result['target_heldout_reward']:.4f}"),
        *([f"NOTE: {result['baseline']} ended its budget no better than it started on the held-out prompts "
           "(target <= initial reward), so the held-out steps/seconds to target are vacuous."]
          if result.get("baseline_improved_heldout") is False else []),
        *([f"NOTE: {result['baseline']}'s smoothed training reward ended no higher than its first step's, so the "
           "training steps/seconds to target are vacuous."] if result.get("baseline_improved_train") is False else []),
        "",
        "| method | (a) steps to target, train | speed-up | (b) seconds to target, train | speed-up "
        "| (a') steps to target, held-out | (b') seconds, held-out | (c) final held-out reward "
        "| train reward - baseline, 2nd half | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    vacuous_train = result.get("baseline_improved_train") is False
    vacuous_held = result.get("baseline_improved_heldout") is False

    def to_target(s: dict[str, Any] | None, fmt: str, vacuous: bool) -> str:
        return "vacuous" if vacuous else spread(s, fmt)

    for name, m in result["methods"].items():
        sp = m["speedup_vs_baseline"]
        fin = m["final_heldout_reward"]
        init = m["initial_heldout_reward"]
        fin_s = "-" if fin is None else f"{fin['mean']:.4f} ± {fin['std']:.4f}"
        if fin is not None and init is not None:
            fin_s += f" (from {init['mean']:.4f})"
        gain = m.get("train_reward_minus_baseline_second_half")
        gain_s = "-" if gain is None else f"{gain['mean']:+.4f} ± {gain['std']:.4f}"
        lines.append(
            f"| {name} | {to_target(m['steps_to_target_train'], '.0f', vacuous_train)} | {ratio(sp['steps_train'])} "
            f"| {to_target(m['seconds_to_target_train'], '.1f', vacuous_train)} | {ratio(sp['seconds_train'])} "
            f"| {to_target(m['steps_to_target_heldout'], '.0f', vacuous_held)} "
            f"| {to_target(m['seconds_to_target_heldout'], '.1f', vacuous_held)} "
            f"| {fin_s} | {gain_s} | {m['seconds_per_step']['mean']:.2f} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ the claim statistic
def interpolated_crossing(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """The step at which a curve of (step, reward) points first reaches ``target``, interpolating linearly between
    the two evaluations around the crossing; the first point itself when it is already there; None if never."""
    prev: tuple[float, float] | None = None
    for step, value in points:
        if value >= target:
            if prev is None or prev[1] >= target:
                return float(step)
            s0, v0 = prev
            return float(s0 + (step - s0) * (target - v0) / (value - v0))
        prev = (step, value)
    return None


def _median_steps(values: Sequence[float | None]) -> float:
    """Median with never-reached runs ranked last; +inf when the median itself never reached the target."""
    med = censored_median(values)
    return math.inf if med is None else med


def _ratio_of_medians(base: Sequence[float | None], other: Sequence[float | None]) -> float:
    """median steps of the baseline / median steps of the method (>1: the method is faster); inf and 0 where a
    median is censored; nan when both are."""
    b, o = _median_steps(base), _median_steps(other)
    if math.isinf(b) and math.isinf(o):
        return math.nan
    if o == 0:
        return math.inf if b > 0 else 1.0
    return b / o


def _auc(points: Sequence[tuple[float, float]], start: float, budget: int) -> float:
    """Mean held-out gain over the budget: trapezoid area of (reward − start) over steps 0..budget, / budget."""
    pts = [(s, v) for s, v in points if s <= budget]
    area = sum((s1 - s0) * ((v0 - start) + (v1 - start)) / 2 for (s0, v0), (s1, v1) in zip(pts, pts[1:]))
    return area / budget if budget else 0.0


def claim_statistics(logs: list[RunLog], baseline: str, target_fraction: float, bootstrap: int,
                     confidence: float, seed: int) -> dict[str, Any]:
    """The pre-registered claim statistic for one task (bench/PROTOCOL.md).

    start = the mean held-out reward at step 0 over the baseline's seeds (every method starts from the same base
    policy and evaluation noise); gain = the baseline's mean final held-out reward − start; target = start +
    ``target_fraction``·gain. Per run: the interpolated first step at which the held-out reward reaches the target
    (None if never). Per method: ratio = median steps of the baseline / median steps of the method, with a paired
    percentile bootstrap over seeds (the same resampled seeds for both); AUC = mean held-out gain over the
    budget, its paired difference to the baseline with a bootstrap interval too.
    """
    import random

    by_method: dict[str, dict[int, RunLog]] = {}
    for log in logs:
        by_method.setdefault(log.method, {})[log.seed] = log
    if baseline not in by_method:
        raise ValueError(f"baseline {baseline!r} has no runs")
    # A run cut by its time limit ends between evaluations: compare every run up to the last evaluation all of them
    # reached (a completed run is evaluated at its last step, so this is the budget when nothing was cut).
    reach = min(min(len(log.steps), max((int(e["step"]) for e in log.evals), default=0)) for log in logs)
    common = set.intersection(*({int(e["step"]) for e in log.evals if int(e["step"]) <= reach} for log in logs))
    budget = max(common) if common else reach
    if budget < 1:
        raise ValueError("no held-out evaluation after step 0 is shared by every run (did the runs fail?)")
    curves = {m: {s: [(float(e["step"]), float(e["heldout_reward"])) for e in r.evals if e["step"] <= budget]
                  for s, r in runs.items()} for m, runs in by_method.items()}
    base = curves[baseline]
    starts = [c[0][1] for c in base.values() if c and c[0][0] == 0]
    finals = [c[-1][1] for c in base.values() if c and c[-1][0] == budget]
    if not starts or not finals:
        raise ValueError("the baseline needs held-out evaluations at step 0 and at the end of the budget")
    start = statistics.fmean(starts)
    gain = statistics.fmean(finals) - start
    target = start + target_fraction * gain
    rng = random.Random(seed)
    lo_q, hi_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    seeds_common = sorted(set.intersection(*(set(c) for c in curves.values())))
    draws = [[rng.choice(seeds_common) for _ in seeds_common] for _ in range(bootstrap)]

    def quantiles(xs: list[float]) -> tuple[float, float]:
        finite = sorted(x for x in xs if not math.isnan(x))
        if not finite:
            return math.nan, math.nan
        return finite[int(lo_q * (len(finite) - 1))], finite[int(math.ceil(hi_q * (len(finite) - 1)))]

    base_steps = {s: interpolated_crossing(c, target) for s, c in base.items()}
    base_auc = {s: _auc(c, start, budget) for s, c in base.items()}
    methods: dict[str, Any] = {}
    for m, runs in curves.items():
        steps = {s: interpolated_crossing(c, target) for s, c in runs.items()}
        auc = {s: _auc(c, start, budget) for s, c in runs.items()}
        ratio = _ratio_of_medians([base_steps[s] for s in seeds_common], [steps[s] for s in seeds_common])
        boot = [_ratio_of_medians([base_steps[s] for s in d], [steps[s] for s in d]) for d in draws]
        diffs = [auc[s] - base_auc[s] for s in seeds_common]
        boot_auc = [statistics.fmean(auc[s] - base_auc[s] for s in d) for d in draws]
        methods[m] = {
            "seeds": sorted(runs),
            "steps_to_target": {str(s): v for s, v in sorted(steps.items())},
            "reached": sum(v is not None for v in steps.values()),
            "median_steps": censored_median(list(steps.values())),
            "ratio_vs_baseline": ratio,
            "ratio_ci": quantiles(boot),
            "ratio_undefined_draws": sum(math.isnan(x) for x in boot),
            "auc": _mean_std(list(auc.values())),
            "auc_minus_baseline": statistics.fmean(diffs) if diffs else None,
            "auc_minus_baseline_ci": quantiles(boot_auc),
            "final_heldout_gain": _mean_std([c[-1][1] - start for c in runs.values() if c and c[-1][0] == budget]),
        }
    return {"budget_steps": budget, "start": start, "baseline_gain": gain, "target": target,
            "target_fraction": target_fraction, "paired_seeds": seeds_common, "methods": methods}
