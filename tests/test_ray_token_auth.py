"""Ray 2.60's token authentication as the KubeRay manifests set it up, on a real `ray start --head`: with
RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in the head's environment (what KubeRay injects from the Secret), `ray job
submit` without the token, or with another, is refused, and the submitter's pair of variables gets in. A job also
reads whatever the head's environment holds, which is why no Secret but the Ray token may reach a Ray pod."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ray_head import free_port, start_head, stop_head

pytestmark = [pytest.mark.ray, pytest.mark.slow]
TOKEN = "test-token-0123456789abcdef"
GRAFANA = "glsa_dummy_grafana_token"


def _submit(dashboard: str, env: dict[str, str], home: Path) -> subprocess.Popen:
    """Start a `ray job submit` (the three submissions of the test run at once: each is mostly the CLI's start-up)."""
    ray_cli = Path(sys.executable).parent / "ray"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return subprocess.Popen(
        [str(ray_cli), "job", "submit", "--address", dashboard, "--",
         "python", "-c", "import os; print('grafana token seen by the job:', os.environ.get('GRAFANA_TOKEN'))"],
        env={**clean, "HOME": str(home), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finished(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_token_auth_refuses_job_submission_without_the_secrets_token_and_admits_the_submitters_env(tmp_path):
    tmpdir = Path(tempfile.mkdtemp(prefix="era", dir="/tmp"))  # short: Ray puts Unix sockets under it
    port = free_port()
    head_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "GRAFANA_TOKEN": GRAFANA}
    head, _ = start_head(tmpdir, "--dashboard-host=127.0.0.1", f"--dashboard-port={port}", env=head_env)
    dashboard = f"http://127.0.0.1:{port}"
    try:
        started = [_submit(dashboard, {"RAY_AUTH_MODE": "disabled"}, tmp_path),
                   _submit(dashboard, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "guessed"}, tmp_path),
                   _submit(dashboard, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}, tmp_path)]
        anonymous, wrong, submitter = [_finished(p) for p in started]
    finally:
        stop_head(head)
        shutil.rmtree(tmpdir, ignore_errors=True)
    assert anonymous.returncode != 0 and "Unauthorized: Missing authentication token" in anonymous.stderr
    assert wrong.returncode != 0 and "Forbidden: Invalid authentication token" in wrong.stderr
    assert submitter.returncode == 0, submitter.stderr
    assert f"grafana token seen by the job: {GRAFANA}" in submitter.stdout
