"""The pre-registered task rule (bench/PROTOCOL.md, amendment 2) applied to pilot logs written by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from euphonium_ray.bench import records

ROOT = Path(__file__).resolve().parents[1]


def _pilot_select():
    spec = importlib.util.spec_from_file_location("pilot_select", ROOT / "bench" / "pilot_select.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_run(out: Path, task: str, seed: int, curve: dict[int, float]) -> None:
    folder = records.run_dir(out, task, "dance-grpo", seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / records.STEPS_FILE).write_text("")
    for step, reward in curve.items():
        records.append_jsonl(folder / records.EVALS_FILE, {"step": step, "heldout_reward": reward})


def _write_prm(folder: Path, r: float) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(
        {"heldout": {"sigma_le_0.6": {"mean_per_step_within_group_pearson": r}}}))
    return folder


def test_task_rule_takes_the_largest_baseline_gain_among_tasks_whose_prm_meets_the_ranking_bar(tmp_path):
    ps = _pilot_select()
    pilot = tmp_path / "pilot"
    for seed in (100, 101):
        _write_run(pilot, "steady", seed, {0: 0.5, 5: 0.6, 10: 0.75})      # largest gain, PRM misses the bar
        _write_run(pilot, "prominence", seed, {0: 0.5, 5: 0.55, 10: 0.62})  # PRM meets the bar
    prms = [_write_prm(tmp_path / "prm-steady", 0.4), _write_prm(tmp_path / "prm-prominence", 0.8)]
    result = ps.select_task(pilot, prms, tmp_path / "selected_task")
    assert result["chosen"] == "prominence"
    assert (tmp_path / "selected_task.txt").read_text().strip() == "prominence"
    assert result["tasks"]["steady"]["dance_grpo_gain"] == pytest.approx(0.25)
    assert result["tasks"]["prominence"]["gain_bar_met"] and not result["tasks"]["steady"]["ranking_bar_met"]


def test_task_rule_compares_at_the_last_evaluation_every_run_shares_and_falls_back_when_no_prm_meets_the_bar(tmp_path):
    ps = _pilot_select()
    pilot = tmp_path / "pilot"
    _write_run(pilot, "steady", 100, {0: 0.5, 5: 0.6, 10: 0.9})    # cut later: step 10 is not shared
    _write_run(pilot, "prominence", 100, {0: 0.5, 5: 0.65})
    prms = [_write_prm(tmp_path / "prm-steady", 0.1), _write_prm(tmp_path / "prm-prominence", 0.2)]
    result = ps.select_task(pilot, prms, tmp_path / "selected_task")
    assert result["evaluated_at_step"] == 5 and result["chosen"] == "prominence"


def test_task_rule_refuses_pilots_with_no_evaluation_after_step_zero(tmp_path):
    ps = _pilot_select()
    pilot = tmp_path / "pilot"
    _write_run(pilot, "steady", 100, {0: 0.5})
    with pytest.raises(SystemExit, match="no evaluation after step 0"):
        ps.select_task(pilot, [_write_prm(tmp_path / "prm-steady", 0.9)], tmp_path / "selected_task")
