"""The benchmark's files: per-run JSON-lines logs, the run description, provenance (git commit, config hashes).

Layout under the output folder::

    run_info.json                     options, settings, world, git commit, config hashes (written first)
    configs/<method>.yaml             each method's resolved RunConfig (loadable by ``euphonium-ray train``)
    runs/<task>/<method>/seed-<s>/steps.jsonl  one training-step record per line
    runs/<task>/<method>/seed-<s>/evals.jsonl  one held-out evaluation per line
    convergence.json / convergence.md / reward_vs_step.png / reward_vs_seconds.png   the report

Logs are appended line by line (and flushed), so a run stopped part-way can still be reported.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from pathlib import Path
from typing import Any

from euphonium_ray.bench.analysis import RunLog
from euphonium_ray.checkpoint import config_hash
from euphonium_ray.config import RunConfig
from euphonium_ray.errors import EuphoniumError
from euphonium_ray.files import write_atomic

RUN_INFO = "run_info.json"
REPORT_JSON = "convergence.json"
REPORT_MD = "convergence.md"
STEPS_FILE = "steps.jsonl"
EVALS_FILE = "evals.jsonl"
REPO_ROOT = Path(__file__).resolve().parents[2]


class RecordError(EuphoniumError, ValueError):
    """A benchmark output folder whose logs cannot be read; the message names the file and line."""


def run_dir(out: Path, task: str, method: str, seed: int) -> Path:
    return out / "runs" / task / method / f"seed-{seed}"


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(record, allow_nan=True) + "\n")
        fh.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise RecordError(f"{path}:{n} is not a JSON record ({exc})") from None
    return out


def json_safe(data: Any) -> Any:
    """Non-finite floats as the strings "inf", "-inf", "nan" (strict JSON has no such numbers), recursively."""
    if isinstance(data, float) and not math.isfinite(data):
        return "nan" if math.isnan(data) else ("inf" if data > 0 else "-inf")
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    return data


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(json_safe(data), indent=2, allow_nan=False, default=str) + "\n")


def load_logs(out: Path) -> list[RunLog]:
    """Every run under ``out/runs`` (task/method/seed-N folders), sorted by task, method, seed."""
    root = out / "runs"
    if not root.is_dir():
        raise RecordError(f"no benchmark runs under {root}")
    logs = []
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for method_dir in sorted(p for p in task_dir.iterdir() if p.is_dir()):
            for seed_dir in sorted(p for p in method_dir.iterdir() if p.is_dir() and p.name.startswith("seed-")):
                try:
                    seed = int(seed_dir.name.removeprefix("seed-"))
                except ValueError:
                    raise RecordError(f"{seed_dir}: expected a folder named seed-<integer>") from None
                logs.append(RunLog(method_dir.name, seed, read_jsonl(seed_dir / STEPS_FILE),
                                   read_jsonl(seed_dir / EVALS_FILE), task=task_dir.name))
    if not logs:
        raise RecordError(f"no runs found under {root}")
    return logs


def git_state(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """The commit the code ran at and whether tracked files differed from it ("unknown" outside a checkout)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def config_hashes(configs: dict[str, RunConfig]) -> dict[str, Any]:
    """Per-method config hashes and one hash over all of them (what a rerun must match to be comparable)."""
    per = {m: config_hash(c) for m, c in configs.items()}
    combined = hashlib.sha256(json.dumps(per, sort_keys=True).encode()).hexdigest()[:16]
    return {"per_method": per, "all": combined}
