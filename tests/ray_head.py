"""A real `ray start --head` for tests, in its own session and Ray temp folder, stopped through the process group it
was started in (never `ray stop`, which stops every Ray on the machine)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(tmpdir: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on 127.0.0.1 with one CPU (and ``args``), its temp root under ``tmpdir``
    (RAY_TMPDIR); returns the process and the GCS address it recorded in ``tmpdir/ray/ray_current_cluster``."""
    ray_cli = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
         "--num-cpus=1", "--disable-usage-stats", *args],
        env={**os.environ, **(env or {}), "RAY_TMPDIR": str(tmpdir)}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    record = tmpdir / "ray" / "ray_current_cluster"
    deadline = time.monotonic() + 90
    while not record.is_file() and time.monotonic() < deadline and head.poll() is None:
        time.sleep(0.5)
    if not record.is_file():
        stop_head(head)
        raise RuntimeError("ray start --head did not come up")
    return head, record.read_text().strip()


def stop_head(head: subprocess.Popen) -> None:
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
