"""``ray job submit`` against a real head started with ``ray start --head`` on loopback, exactly as a user does it.

The head gets its own temp dir; afterwards exactly the processes this test started are stopped (the ``ray start
--block`` process tree, plus daemons whose command line names our temp dir), never by program name: ``ray stop``
would also stop other Ray instances on a shared machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]
BIN = Path(sys.executable).parent
DASHBOARD = "http://127.0.0.1:8265"


def _stop_started(proc: subprocess.Popen, marker: str) -> None:
    procs: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(proc.pid)
        procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(marker in part for part in (p.info["cmdline"] or [])):
            procs.setdefault(p.pid, p)
    for p in procs.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def _wait_for_head(proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{DASHBOARD}/api/version", timeout=5) as resp:  # noqa: S310
                if json.loads(resp.read()).get("ray_version"):
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise AssertionError(f"the Ray head's job API did not come up in {timeout_s:.0f}s:\n{log.read_text()[-4000:]}")


def test_ray_job_submit_trains_on_a_ray_start_head_cluster(world, tmp_path):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="eray-", dir="/tmp")  # short: Ray's socket paths live under it
    log = tmp_path / "ray-start.log"
    with open(log, "wb") as sink:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats",
             f"--temp-dir={temp_dir}"],
            cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    out = tmp_path / "job-run"
    try:
        _wait_for_head(head, log)
        sets = [
            f"model.path={world / 'toy-model'}",
            f"data.prompts={world / 'toy-model' / 'embeddings' / 'videos2caption.json'}", "data.eval_prompts=null",
            f"rewards.prm.path={world / 'toy-prm'}", f"output.dir={out}", "steps=1",
            "data.prompts_per_step=2", "sampler.group_size=4", "sampler.num_steps=8", "rgg.start=5", "spsa.start=5",
            "cluster.rollout_cpus=0.5", "cluster.learner_cpus=0.5",
            # the before/after evaluation only has to run and print its line: one prompt, one sample
            "output.eval_count=1", "output.eval_samples_per_prompt=1",
        ]
        cmd = [str(BIN / "ray"), "job", "submit", "--address", DASHBOARD, "--working-dir", ".", "--",
               "euphonium-ray", "train", "--config", "configs/toy.yaml", "--no-progress"]
        for s in sets:
            cmd += ["--set", s]
        job = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
        text = job.stdout + job.stderr
        assert job.returncode == 0, text[-4000:]
        assert "succeeded" in text and "ORM reward of unguided ODE samples" in text
        assert (out / "checkpoints" / "step-1" / "transformer" / "config.json").is_file()
    finally:
        _stop_started(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
