"""`euphonium-ray train` without an address starts its own Ray on 127.0.0.1, whatever else this machine runs: a
`ray start --head` (which plain ``ray.init()`` would join) or a stale record of one in Ray's temp folder (which plain
``ray.init()`` would try to reach); and what that Ray's workers print goes to the run's ``logs/ray.log``, not the
console. The head here is real, started by the test in Ray's CLI, and stopped by the process group the test created
(never `ray stop`, which stops every Ray on the machine)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import ray

from euphonium_ray.driver import train

from ray_head import start_head, stop_head
from conftest import run_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]
HEAD_RESOURCE = "intruder_head"  # only the foreign head advertises it


def _where_ray_runs() -> dict[str, Any]:
    return {"gcs": ray.get_runtime_context().gcs_address, "resources": ray.cluster_resources(),
            "node_ips": sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})}


def _assert_private(seen: dict[str, Any], head_address: str) -> None:
    assert seen["gcs"] != head_address and seen["gcs"].startswith("127.0.0.1:")
    assert HEAD_RESOURCE not in seen["resources"]
    assert seen["resources"]["CPU"] == 2  # cluster.num_cpus, not the head's 1
    assert seen["node_ips"] == ["127.0.0.1"]


@pytest.fixture(scope="module")
def beside_a_head(world, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """One one-step run through the train command's own connect(), with a `ray start --head` up on this machine;
    the console (Python's stdout and stderr) is captured. The head is stopped afterwards without `ray stop`."""
    assert not ray.is_initialized()
    tmpdir = Path(tempfile.mkdtemp(prefix="erp", dir="/tmp"))  # short: Ray puts Unix sockets under it
    out = tmp_path_factory.mktemp("beside-a-head")
    with pytest.MonkeyPatch.context() as env, contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, tmpdir, ignore_errors=True)
        env.setenv("RAY_TMPDIR", str(tmpdir))  # the head's record of itself lands where only this test looks
        env.delenv("RAY_ADDRESS", raising=False)
        env.setenv("RAY_AUTH_MODE", "disabled")
        head, head_address = start_head(tmpdir, "--include-dashboard=false",
                                        f"--resources={json.dumps({HEAD_RESOURCE: 1})}")
        seen: dict[str, Any] = {}
        console = io.StringIO()
        try:
            with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
                summary = train(run_config(world, out / "run", "steps=1"), progress=False, evaluate=False,
                                on_event=lambda event, *_: seen.update(_where_ray_runs()) if event == "step_start"
                                else None)
        finally:
            stop_head(head)
        yield {"summary": summary, "seen": seen, "head": head, "head_address": head_address, "tmpdir": tmpdir,
               "console": console.getvalue(), "logs": out / "run" / "logs", "world": world, "out": out}


def test_train_without_an_address_starts_a_private_loopback_ray_beside_a_live_ray_start_head(beside_a_head):
    assert not ray.is_initialized()  # the run shut down the Ray it started
    assert [h["step"] for h in beside_a_head["summary"]["history"]] == [0]
    _assert_private(beside_a_head["seen"], beside_a_head["head_address"])
    note = "started a private local Ray on 127.0.0.1 only; token authentication off (RAY_AUTH_MODE=disabled)"
    assert note in (beside_a_head["logs"] / "train.log").read_text() and note in beside_a_head["console"]


STALE_PROBE = """
import json, sys
import ray
sys.path.insert(0, sys.argv[1])
from euphonium_ray.driver import connect
from test_private_ray import _where_ray_runs
from conftest import run_config
from pathlib import Path
started = connect(run_config(Path(sys.argv[2]), Path(sys.argv[3])), None)
print(json.dumps({"started": started, **_where_ray_runs()}))
ray.shutdown()
"""


def test_a_stale_record_of_a_head_in_the_temp_folder_does_not_catch_the_next_run(beside_a_head):
    # the head was killed without `ray stop`, so its record in the temp folder now names a dead address
    assert beside_a_head["head"].poll() is not None
    record = beside_a_head["tmpdir"] / "ray" / "ray_current_cluster"
    assert record.read_text().strip() == beside_a_head["head_address"]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "RAY_TMPDIR": str(beside_a_head["tmpdir"]), "RAY_AUTH_MODE": "disabled"}
    probe = subprocess.run([sys.executable, "-c", STALE_PROBE, str(Path(__file__).parent), str(beside_a_head["world"]),
                            str(beside_a_head["out"] / "again")], env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert seen.pop("started") is True
    _assert_private(seen, beside_a_head["head_address"])


def test_ray_train_report_lines_and_worker_tracebacks_go_to_the_run_log_not_the_console(beside_a_head):
    ray_log = (beside_a_head["logs"] / "ray.log").read_text()
    console = beside_a_head["console"]
    assert "(RayTrainWorker pid=" in ray_log and "Reporting training result 1: TrainingReport(" in ray_log
    for worker_line in ("Reporting training result", "TrainController", "RayTrainWorker", "PlacementGroupCleaner",
                        "Traceback", "Started a local Ray instance"):
        assert worker_line not in console, console
    # what is left on the console is ours: the driver's lines and its summary
    assert all(line.startswith(("[euphonium] ", "  ")) for line in console.splitlines() if line.strip()), console
