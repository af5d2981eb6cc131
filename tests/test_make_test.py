"""The README's test command on a machine that lacks a system package: it installs it when it may (root with apt)
and otherwise stops in its first seconds with the one command to run, before building anything."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("sh", "make", "id", "unshare", "ip", "python3")  # what the check itself runs; prometheus is left out


def _as_a_user() -> list[str]:
    """Root would install the package; run as `nobody` to take the other branch (util-linux setpriv)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to run the check as a plain user"
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_make_test_without_prometheus_as_a_plain_user_stops_in_seconds_with_the_command_to_run() -> None:
    work = Path(tempfile.mkdtemp(prefix="mk", dir="/tmp"))  # readable by the plain user, unlike pytest's tmp_path
    try:
        shutil.copy(REPO / "Makefile", work / "Makefile")
        shutil.copytree(REPO / "scripts", work / "scripts")
        bin_dir = work / "bin"  # a PATH with the basic tools and no prometheus, wherever this machine has one
        bin_dir.mkdir()
        for tool in TOOLS:
            found = shutil.which(tool, path="/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            if found:
                (bin_dir / tool).symlink_to(found)
        for path in [work, *work.rglob("*")]:
            path.chmod(0o755) if path.is_dir() else None
        before = _tree(work)
        start = time.monotonic()
        proc = subprocess.run(_as_a_user() + [str(bin_dir / "make"), "test"], cwd=work, capture_output=True,
                              text=True, timeout=60, env={"PATH": str(bin_dir), "HOME": str(work), "PYTHON": "python3"})
        elapsed = time.monotonic() - start
    finally:
        after = _tree(work)
        shutil.rmtree(work, ignore_errors=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: make test needs Debian packages: prometheus; run: sudo apt-get install -y prometheus"]
    assert elapsed < 10, elapsed
    assert after == before  # no .venv, no .venv-vllm: nothing was built
    assert "pip" not in proc.stdout + proc.stderr


def test_the_check_passes_silently_once_the_packages_are_there() -> None:
    assert shutil.which("prometheus") and shutil.which("promtool"), (
        "Debian's prometheus is missing: `make test` installs it as root, else run: sudo apt-get install -y prometheus"
    )
    start = time.monotonic()
    proc = subprocess.run(["sh", str(REPO / "scripts" / "test_prereqs.sh")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHON": "python3"})
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert time.monotonic() - start < 5


def test_ci_runs_the_readme_test_command_then_the_slow_suites() -> None:
    commands = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert commands == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', "export CI=true", "make test",
                        "make test-slow"]
    assert "make test   # run the test suite" in (REPO / "README.md").read_text()
    makefile = (REPO / "Makefile").read_text()  # the two targets split the suite by the slow mark, nothing lost
    assert '-m pytest -q -m "not slow" tests' in makefile and "-m pytest -q -m slow tests" in makefile
