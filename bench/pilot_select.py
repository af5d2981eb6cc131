"""The pilots' pre-registered selection rules (bench/PROTOCOL.md), applied mechanically to the pilot logs.

``baseline``: among the DanceGRPO grid folders (one per (same_initial_noise, lr)), the pair with the highest
held-out gain at the last evaluation every configuration completed, averaged over tasks and pilot seeds; writes the
``--set`` overrides that every later run uses. ``variant``: among the learned-PRM Euphonium variants, the one with
the highest mean over tasks of the paired held-out AUC difference to DanceGRPO; writes
``bench/configs/euphonium-best.yaml`` and ``bench/configs/oracle-control.yaml``. ``task`` (amendment 2): among candidate preference tasks, the one whose
DanceGRPO pilot gains most on held-out prompts, among those whose latent PRM meets the ranking bar (all of them if
none does); writes its name. Each writes a JSON of every number it compared.

    python bench/pilot_select.py baseline --grid OUT/grid-* --out OUT/selected_base
    python bench/pilot_select.py variant --pilot OUT/variants --sets OUT/selected_base.sets --out OUT/selected_variant
    python bench/pilot_select.py apply --sets OUT/selected_base.sets   # the chosen pair into bench/configs/base.yaml
    python bench/pilot_select.py task --pilot OUT/task-pilot --prms OUT/prm-prominence OUT/prm-steady --out OUT/selected_task
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from euphonium_ray.bench import records  # noqa: E402
from euphonium_ray.bench.analysis import claim_statistics  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
VARIANTS = ["euph-credit", "euph-credit-half05", "euph-credit-half20", "euph-credit-half20-glp",
            "euph-credit-half20-distill"]


def _gain_at(logs: list[records.RunLog], step: int) -> dict[str, float]:
    """Per task: mean over seeds of held-out(step) − held-out(0)."""
    out: dict[str, list[float]] = {}
    for lg in logs:
        ev = {e["step"]: e["heldout_reward"] for e in lg.evals}
        if 0 in ev and step in ev:
            out.setdefault(lg.task, []).append(ev[step] - ev[0])
    return {t: statistics.fmean(v) for t, v in out.items()}


def select_baseline(grid: list[Path], out: Path) -> dict:
    logs = {g: records.load_logs(g) for g in grid}
    last = min(max(e["step"] for lg in lgs for e in lg.evals) for lgs in logs.values())
    table = {}
    for g, lgs in logs.items():
        m = re.search(r"noise_(true|false)-lr_([0-9.e+-]+)$", g.name)
        if not m:
            raise SystemExit(f"{g}: expected a folder named grid-noise_<true|false>-lr_<lr>")
        gains = _gain_at(lgs, last)
        table[g.name] = {"same_initial_noise": m.group(1), "lr": m.group(2), "gain_by_task": gains,
                         "mean_gain": statistics.fmean(gains.values())}
    tasks = sorted({t for row in table.values() for t in row["gain_by_task"]})
    for name, row in table.items():  # a unit that failed leaves its configuration averaged over fewer tasks: say so
        row["missing_tasks"] = [t for t in tasks if t not in row["gain_by_task"]]
        if row["missing_tasks"]:
            print(f"WARNING: {name} has no evaluation at step {last} on {', '.join(row['missing_tasks'])}: "
                  "its mean is over the other tasks")
    best = max(table.values(), key=lambda r: r["mean_gain"])
    sets = [f"sampler.same_initial_noise={best['same_initial_noise']}", f"optim.lr={best['lr']}"]
    result = {"rule": "highest held-out gain at the last common evaluation, mean over tasks and pilot seeds",
              "evaluated_at_step": last, "configurations": table, "chosen": best, "sets": sets}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".sets").write_text("\n".join(sets) + "\n")
    print(f"baseline: at step {last}: " + "; ".join(f"{k} {v['mean_gain']:+.4f}" for k, v in table.items()))
    print(f"chosen: {' '.join(sets)}")
    return result


def select_variant(pilot: Path, out: Path, configs: Path = CONFIGS) -> dict:
    logs = records.load_logs(pilot)
    by_task: dict[str, dict] = {}
    for task in sorted({lg.task for lg in logs}):
        claim = claim_statistics([lg for lg in logs if lg.task == task], "dance-grpo", 0.8, 1000, 0.95, 0)
        by_task[task] = {m: {"auc_minus_baseline": c["auc_minus_baseline"], "ratio_vs_baseline": c["ratio_vs_baseline"],
                             "final_heldout_gain": c["final_heldout_gain"]["mean"]}
                         for m, c in claim["methods"].items()}
    scores = {v: statistics.fmean(by_task[t][v]["auc_minus_baseline"] for t in by_task)
              for v in VARIANTS if all(v in by_task[t] for t in by_task)}
    if not scores:
        raise SystemExit(f"no learned-PRM variant ran in {pilot}")
    best = max(scores, key=scores.get)
    (configs / "euphonium-best.yaml").write_text(
        f"# The Euphonium variant the pilot chose (bench/PROTOCOL.md, stage B): the learned-PRM variant with the\n"
        f"# highest mean over tasks of the paired held-out AUC difference to DanceGRPO on pilot seeds\n"
        f"# ({', '.join(f'{k} {v:+.4f}' for k, v in scores.items())}); written by bench/pilot_select.py.\n"
        f"extends: {best}.yaml\n")
    (configs / "oracle-control.yaml").write_text(
        "# The oracle-PRM control: the chosen Euphonium variant with the exact process reward of the toy world\n"
        "# (the task reward of x0_hat(x_k), its gradient through the policy; euphonium_ray/toy/oracle.py).\n"
        "extends: euphonium-best.yaml\nrewards:\n  prm:\n    kind: oracle\n")
    result = {"rule": "learned-PRM variant with the highest mean over tasks of the paired held-out AUC difference "
                      "to dance-grpo", "by_task": by_task, "scores": scores, "chosen": best}
    out.with_suffix(".json").write_text(json.dumps(records.json_safe(result), indent=2) + "\n")
    print("variants (mean AUC − dance-grpo): " + "; ".join(f"{k} {v:+.4f}" for k, v in scores.items()))
    print(f"chosen: {best}")
    return result


RANKING_BAR = 0.6  # PROTOCOL.md: mean within-group Pearson correlation over the steps with 0 < sigma <= 0.6
GAIN_BAR = 0.10    # PROTOCOL.md: DanceGRPO's held-out gain within the budget


def prm_ranking(prm_folder: Path) -> float:
    """The PRM's published ranking quality (``metrics.json``: within-group correlation at sigma <= 0.6)."""
    metrics = json.loads((prm_folder / "metrics.json").read_text())
    return float(metrics["heldout"]["sigma_le_0.6"]["mean_per_step_within_group_pearson"])


def select_task(pilot: Path, prms: list[Path], out: Path) -> dict:
    """Amendment 2's rule: the candidate task with the highest DanceGRPO held-out gain at the last evaluation every
    pilot run completed (mean over pilot seeds), among the candidates whose PRM meets the ranking bar."""
    logs = [lg for lg in records.load_logs(pilot) if lg.method == "dance-grpo"]
    if not logs:
        raise SystemExit(f"no dance-grpo pilot run in {pilot}")
    last = min(max(e["step"] for e in lg.evals) for lg in logs)
    if last <= 0:
        raise SystemExit(f"{pilot}: no evaluation after step 0 is shared by every pilot run")
    gains = _gain_at(logs, last)
    ranking = {}
    for folder in prms:
        task = folder.name.removeprefix("prm-")
        try:
            ranking[task] = prm_ranking(folder)
        except (OSError, KeyError, ValueError) as exc:
            print(f"WARNING: {folder}: no ranking metric ({exc}); counted as missing the bar")
            ranking[task] = float("nan")
    table = {t: {"dance_grpo_gain": g, "gain_bar_met": g >= GAIN_BAR, "prm_within_group_r": ranking.get(t),
                 "ranking_bar_met": bool(ranking.get(t, 0.0) >= RANKING_BAR)} for t, g in gains.items()}
    eligible = [t for t in table if table[t]["ranking_bar_met"]] or list(table)
    best = max(eligible, key=lambda t: table[t]["dance_grpo_gain"])
    result = {"rule": "highest dance-grpo held-out gain at the last common evaluation (mean over pilot seeds) among "
                      "candidates whose PRM meets the ranking bar (all candidates if none does)",
              "evaluated_at_step": last, "gain_bar": GAIN_BAR, "ranking_bar": RANKING_BAR, "tasks": table,
              "chosen": best}
    out.with_suffix(".json").write_text(json.dumps(records.json_safe(result), indent=2) + "\n")
    out.with_suffix(".txt").write_text(best + "\n")
    print(f"task pilot at step {last}: " + "; ".join(
        f"{t} gain {r['dance_grpo_gain']:+.4f} (bar {'met' if r['gain_bar_met'] else 'missed'}), PRM r "
        f"{r['prm_within_group_r']} (bar {'met' if r['ranking_bar_met'] else 'missed'})" for t, r in table.items()))
    print(f"chosen: {best}")
    return result


def apply_baseline(sets_file: Path, base: Path = CONFIGS / "base.yaml") -> list[str]:
    """Write the chosen baseline pair into ``base.yaml`` in place (its comments kept), so the final run reads it."""
    text = base.read_text()
    sets = [s for s in sets_file.read_text().split() if s]
    for s in sets:
        key, value = s.split("=", 1)
        leaf = key.split(".")[-1]
        text, n = re.subn(rf"^(\s+{re.escape(leaf)}:\s*)\S+", lambda m: m.group(1) + value, text, count=1,
                          flags=re.MULTILINE)
        if n != 1:
            raise SystemExit(f"{base}: no line '{leaf}:' to set from {sets_file}")
    base.write_text(text)
    print(f"{base}: " + " ".join(sets))
    return sets


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("baseline")
    b.add_argument("--grid", type=Path, nargs="+", required=True)
    b.add_argument("--out", type=Path, required=True)
    v = sub.add_parser("variant")
    v.add_argument("--pilot", type=Path, required=True)
    v.add_argument("--out", type=Path, required=True)
    v.add_argument("--configs", type=Path, default=CONFIGS)
    ap = sub.add_parser("apply")
    ap.add_argument("--sets", type=Path, required=True)
    ap.add_argument("--base", type=Path, default=CONFIGS / "base.yaml")
    t = sub.add_parser("task")
    t.add_argument("--pilot", type=Path, required=True)
    t.add_argument("--prms", type=Path, nargs="+", required=True)
    t.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.what == "baseline":
        select_baseline(a.grid, a.out)
    elif a.what == "apply":
        apply_baseline(a.sets, a.base)
    elif a.what == "task":
        select_task(a.pilot, a.prms, a.out)
    else:
        select_variant(a.pilot, a.out, a.configs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
