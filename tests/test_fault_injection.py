"""Fault injection at scale (issue 16 item 11): ten seeded SIGKILLs of the run's processes (rollout worker, PRM and
ORM scorers, the Ray Train learner's worker) and one of the driver, then ``--resume latest``; the run ends with the
undisturbed run's parameters and optimizer state, bit for bit, and its step log holds every step exactly once."""

from __future__ import annotations

import json

import pytest

from euphonium_ray.fault_injection import ROLES, make_schedule, run_fault_injection

from conftest import run_config


@pytest.mark.ray
@pytest.mark.slow
def test_ten_seeded_kills_of_every_role_and_one_of_the_driver_change_no_parameter_and_lose_no_step(world, local_ray,
                                                                                                      tmp_path):
    # 4 steps, a checkpoint every 2: role kills in steps 0-2 (a learner restarted in step 1 replays step 0 from the
    # base model), the driver dies in step 3, and --resume latest redoes step 2, which it had logged, and step 3
    cfg = run_config(world, tmp_path / "unused", "steps=4", "output.save_every=2", "output.eval_count=1",
                     "output.eval_samples_per_prompt=1")
    report = run_fault_injection(cfg, tmp_path, seed=0, kills=10, kill_steps=3)
    print(json.dumps({k: v for k, v in report.items() if k != "driver_output_tail"}, indent=1))
    assert sorted({k["role"] for k in report["kills"]}) == sorted(ROLES)
    assert len(report["kills"]) == 10 and all(k["hit"] for k in report["kills"]), report["kills"]
    assert report["learner_restart_lines"], "no learner restart was logged"
    assert report["resumed_from"], "the second driver did not resume"
    assert report["every_step_once"], report["logged_steps"]
    assert report["bit_identical"], report["differ"][:10]


def test_the_schedule_is_a_function_of_its_seed_and_hits_every_role():
    timings = [{"rollout": 2.0, "reward": 1.0, "advantage": 0.1, "learn": 3.0, "step": 6.5}] * 4
    a, b = make_schedule(7, timings, kill_steps=3), make_schedule(7, timings, kill_steps=3)
    assert a == b and a != make_schedule(8, timings, kill_steps=3)
    assert len(a.kills) == 10 and {k.role for k in a.kills} == set(ROLES)
    assert len({(k.role, k.step) for k in a.kills}) == 10 and a.driver_step == 3
    for k in a.kills:  # the delay lands inside the phase it names
        start = {"rollout": 0.0, "reward": 2.0, "learn": 3.1}[k.phase]
        assert start <= k.delay_s <= start + timings[0][k.phase]
