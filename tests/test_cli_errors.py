"""Bad input to `euphonium-ray train` ends in one line on stderr and exit code 2, with nothing on disk changed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "euphonium_ray.cli"]


def _without_root_override() -> list[str]:
    """Root ignores file modes; drop the capabilities that let it (util-linux setpriv), so 0o555 means read-only."""
    if os.geteuid() != 0:
        return []
    assert shutil.which("setpriv"), "setpriv (util-linux) is needed to test permissions as root"
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def _tree(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def test_a_read_only_output_folder_gets_one_line_and_no_traceback(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("a previous run's file\n")
    before = _tree(out)
    out.chmod(0o555)
    try:
        proc = subprocess.run(
            _without_root_override() + CLI + ["train", "--config", str(REPO / "configs" / "toy.yaml"), "--no-env",
                                              "--set", f"output.dir={out}"],
            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, timeout=300,
        )
    finally:
        out.chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: output.dir {out} cannot be written: Permission denied ({out / 'logs'})"
    ]
    assert _tree(out) == before


def test_an_empty_config_file_given_to_train_says_it_is_empty(tmp_path):
    empty = tmp_path / "run.yaml"
    empty.write_text("# to be filled in\n")
    proc = subprocess.run(CLI + ["train", "--config", str(empty)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: config file {empty} is empty (no keys at all); start from configs/toy.yaml"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]  # no outputs/ appeared
