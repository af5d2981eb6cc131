"""``ray job submit`` against a real head started with ``ray start --head`` on loopback, exactly as a user does it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_ray_components import ROOT, world  # noqa: F401  (fixture)

pytestmark = [pytest.mark.ray, pytest.mark.slow]
BIN = Path(sys.executable).parent


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_trains_on_a_ray_start_head_cluster(world, tmp_path):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    start = _run([str(BIN / "ray"), "start", "--head", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                  "--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats"], env, 180)
    assert start.returncode == 0, start.stdout + start.stderr
    out = tmp_path / "job-run"
    try:
        sets = [
            f"model.path={world / 'toy-model'}",
            f"data.prompts={world / 'toy-model' / 'embeddings' / 'videos2caption.json'}",
            f"rewards.prm.path={world / 'toy-prm'}", f"output.dir={out}", "steps=2",
            "data.prompts_per_step=2", "sampler.group_size=4", "sampler.num_steps=8", "rgg.start=5", "spsa.start=5",
            "cluster.rollout_cpus=0.5", "cluster.learner_cpus=0.5",
        ]
        cmd = [str(BIN / "ray"), "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".", "--",
               "euphonium-ray", "train", "--config", "configs/toy.yaml", "--no-progress"]
        for s in sets:
            cmd += ["--set", s]
        job = _run(cmd, env, 420)
        text = job.stdout + job.stderr
        assert job.returncode == 0, text[-4000:]
        assert "succeeded" in text and "ORM reward of unguided ODE samples" in text
        assert (out / "checkpoints" / "step-2" / "transformer" / "config.json").is_file()
    finally:
        stop = _run([str(BIN / "ray"), "stop", "--force"], env, 120)
        assert stop.returncode == 0, stop.stderr
