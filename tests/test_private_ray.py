"""`euphonium-ray train` without an address starts its own Ray on 127.0.0.1, whatever else this machine runs: a
`ray start --head` (which plain ``ray.init()`` would join) or a stale record of one in Ray's temp folder (which plain
``ray.init()`` would try to reach). The head here is real, started by the test in Ray's CLI, and stopped by the
process group the test created (never `ray stop`, which stops every Ray on the machine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import ray

from euphonium_ray.driver import connect, train

from test_ray_components import run_config, world  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.ray, pytest.mark.slow]
HEAD_RESOURCE = "intruder_head"  # only the foreign head advertises it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_tmpdir(monkeypatch) -> Iterator[Path]:
    """A private Ray temp root (short: Ray puts Unix sockets under it), so the head's record of itself is written
    where this test, and nobody else, looks."""
    root = Path(tempfile.mkdtemp(prefix="erp", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(root))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _start_head(tmpdir: Path) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` in a new session; returns it and the GCS address it recorded."""
    port = _free_port()
    ray_cli = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
         f"--resources={json.dumps({HEAD_RESOURCE: 1})}", "--include-dashboard=false", "--disable-usage-stats"],
        env=dict(os.environ), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    record = tmpdir / "ray" / "ray_current_cluster"
    deadline = time.monotonic() + 90
    while not record.is_file() and time.monotonic() < deadline and head.poll() is None:
        time.sleep(0.5)
    assert record.is_file(), "ray start --head did not come up"
    return head, record.read_text().strip()


def _stop_head(head: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process group this test created (the head and everything it spawned)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            return
        try:
            head.wait(15)
        except subprocess.TimeoutExpired:
            pass


def _where_ray_runs() -> dict[str, Any]:
    return {"gcs": ray.get_runtime_context().gcs_address, "resources": ray.cluster_resources(),
            "node_ips": sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})}


def _assert_private(seen: dict[str, Any], head_address: str) -> None:
    assert seen["gcs"] != head_address and seen["gcs"].startswith("127.0.0.1:")
    assert HEAD_RESOURCE not in seen["resources"] and seen["resources"]["CPU"] == 2  # cluster.num_cpus, not the head's 1
    assert seen["node_ips"] == ["127.0.0.1"]


def test_train_without_an_address_starts_a_private_loopback_ray_beside_a_live_head_and_after_it_left_a_stale_record(
    world, ray_tmpdir, tmp_path
):
    assert not ray.is_initialized()
    head, head_address = _start_head(ray_tmpdir)
    seen: dict[str, Any] = {}
    try:  # a whole (one-step) run through the train command's own connect(), with the head up
        summary = train(run_config(world, tmp_path / "run", "steps=1"), progress=False, evaluate=False,
                        on_event=lambda event, *_: seen.update(_where_ray_runs()) if event == "step_start" else None)
    finally:
        _stop_head(head)
    assert not ray.is_initialized()  # the run shut down the Ray it started
    assert [h["step"] for h in summary["history"]] == [0]
    _assert_private(seen, head_address)
    log = (tmp_path / "run" / "logs" / "train.log").read_text()
    assert "started a private local Ray on 127.0.0.1 only; token authentication off (RAY_AUTH_MODE=disabled)" in log

    # the head was killed without `ray stop`, so its record in the temp folder now names a dead address
    assert head.poll() is not None
    assert (ray_tmpdir / "ray" / "ray_current_cluster").read_text().strip() == head_address
    assert connect(run_config(world, tmp_path / "again"), None) is True
    try:
        _assert_private(_where_ray_runs(), head_address)
    finally:
        ray.shutdown()
