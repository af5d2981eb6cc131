"""Training checkpoints: the transformer in the diffusers layout, the optimizer in safetensors, resume state in JSON.

``root/checkpoints/step-N/`` holds ``transformer/`` (loadable by ``HunyuanVideoTransformer3DModel.from_pretrained``),
``optimizer.safetensors`` + ``optimizer.json`` and ``state.json``. A checkpoint is written into a temporary folder
beside its target, fsynced and renamed into place, so a crash mid-write leaves the previous checkpoints as they were
and ``latest_checkpoint`` never returns a half-written one. Nothing is unpickled: weights are safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from euphonium_ray.errors import EuphoniumError

CHECKPOINTS_DIR = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
STATE_FILE = "state.json"
FORMAT_VERSION = 1


class CheckpointError(EuphoniumError, ValueError):
    """A checkpoint that cannot be read or written; the message names the file."""


# ------------------------------------------------------------------------------------------ weights
def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Load a safetensors file to CPU; a missing or corrupted file is reported by name."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error type for bad headers / truncated data
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def read_transformer_weights(location: str | Path) -> dict[str, Tensor]:
    """The state dict of a transformer checkpoint given as a ``.safetensors`` file, a diffusers transformer folder
    (single file or sharded with an index), or a folder holding ``transformer/`` (a model folder or our step-N)."""
    loc = Path(location)
    if loc.is_file():
        return read_safetensors(loc)
    if not loc.is_dir():
        raise CheckpointError(f"checkpoint not found: {loc}")
    if not (loc / WEIGHTS_NAME).exists() and not (loc / WEIGHTS_INDEX_NAME).exists() and (loc / "transformer").is_dir():
        loc = loc / "transformer"
    if (loc / WEIGHTS_NAME).exists():
        return read_safetensors(loc / WEIGHTS_NAME)
    index_path = loc / WEIGHTS_INDEX_NAME
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path} is not a valid safetensors index ({exc})") from None
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_safetensors(loc / shard))
        return state
    raise CheckpointError(f"{loc} holds no {WEIGHTS_NAME} (nor a sharded index {WEIGHTS_INDEX_NAME})")


# ---------------------------------------------------------------------------------------- optimizer
def _jsonable(value: Any, where: str) -> Any:
    try:
        json.dumps(value)
    except TypeError:
        raise CheckpointError(f"{where}: {value!r} cannot be stored in JSON") from None
    return value


def optimizer_to_files(optimizer: torch.optim.Optimizer,
                       state_dict: dict[str, Any] | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` (or ``state_dict``, the same form gathered from FSDP shards) into flat
    tensors (``state.<param>.<name>``) and a JSON-able rest."""
    sd = optimizer.state_dict() if state_dict is None else state_dict
    tensors: dict[str, Tensor] = {}
    state_meta: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value.detach().cpu().clone().contiguous()
            else:
                state_meta.setdefault(str(pid), {})[name] = _jsonable(value, f"optimizer state {pid}.{name}")
    groups = []
    for i, group in enumerate(sd["param_groups"]):
        plain = {}
        for name, value in group.items():
            if torch.is_tensor(value):
                tensors[f"group.{i}.{name}"] = value.detach().cpu().clone().contiguous()
            else:
                plain[name] = _jsonable(list(value) if isinstance(value, tuple) else value, f"param group {i}.{name}")
        groups.append(plain)
    meta = {"class": type(optimizer).__name__, "param_groups": groups, "state": state_meta}
    return tensors, meta


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor],
                         meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``optimizer_to_files``: the state dict in ``optimizer.state_dict()``'s form, checked against
    ``optimizer`` (its class and param groups); load it with ``optimizer.load_state_dict``."""
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointError(f"optimizer state is for {meta.get('class')}, not {type(optimizer).__name__}")
    current = optimizer.state_dict()["param_groups"]
    groups = [dict(g) for g in meta["param_groups"]]
    if len(groups) != len(current):
        raise CheckpointError(f"optimizer state has {len(groups)} param groups, the optimizer has {len(current)}")
    state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in meta["state"].items()}
    for key, tensor in tensors.items():
        kind, idx, name = key.split(".", 2)
        if kind == "state":
            state.setdefault(int(idx), {})[name] = tensor
        else:
            groups[int(idx)][name] = tensor
    for group, live in zip(groups, current):
        for name, value in live.items():  # JSON turned tuples (betas) into lists; give them back their type
            if isinstance(value, tuple) and isinstance(group.get(name), list):
                group[name] = tuple(group[name])
    return {"state": state, "param_groups": groups}


def read_optimizer_state(folder: str | Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state a checkpoint folder holds, in ``optimizer.state_dict()``'s form (not yet loaded)."""
    folder = Path(folder)
    meta = _read_json(folder / OPTIMIZER_META, f"checkpoint {folder} has no optimizer state")
    return optimizer_from_files(optimizer, read_safetensors(folder / OPTIMIZER_TENSORS), meta)


# ------------------------------------------------------------------------------------------- layout
def checkpoints_dir(root: str | Path) -> Path:
    return Path(root) / CHECKPOINTS_DIR


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root/checkpoints`` as (step, path), oldest first."""
    base = checkpoints_dir(root)
    if not base.is_dir():
        return []
    found = []
    for child in base.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint (for ``--resume latest``), or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def config_hash(config: Any) -> str:
    """A short stable hash of a run config (pydantic model or mapping), stored so a resume can tell configs apart."""
    data = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def state_nbytes(state: dict[str, Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in state.values()))


def state_digest(state: dict[str, Tensor]) -> str:
    """A hash of names, dtypes and exact bytes: equal digests mean bit-identical parameters."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_dir(target: Path, fill) -> Path:
    """Create ``target`` by calling ``fill(tmp_dir)`` on a temp folder beside it, fsyncing, then renaming.

    If ``fill`` raises, the temp folder is removed and ``target`` (if it existed) is untouched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    old: Path | None = None
    try:
        fill(tmp)
        _fsync_tree(tmp)
        if target.exists():  # re-saving the same step: move the old one aside first (rename onto a dir fails)
            old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _remove_stale_temps(base: Path) -> None:
    """Temp folders left by a crashed save (a process killed between mkdtemp and rename)."""
    for child in base.glob(".tmp-step-*"):
        shutil.rmtree(child, ignore_errors=True)


# ------------------------------------------------------------------------------------------ save/load
def save_checkpoint(
    root: str | Path,
    step: int,
    policy: Any,
    optimizer: torch.optim.Optimizer | None,
    run_state: dict[str, Any],
    *,
    keep: int | None = None,
    policy_state: dict[str, Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``root/checkpoints/step-N`` atomically and keep only the newest ``keep`` checkpoints.

    ``policy_state`` / ``optimizer_state``: full states gathered from FSDP shards, written in place of what the
    (sharded) ``policy`` and ``optimizer`` hold, into the same files."""
    if step < 0:
        raise CheckpointError(f"step must be >= 0, got {step}")
    state = {"format": FORMAT_VERSION, **run_state, "step": int(step)}
    _jsonable(state, "run state")
    base = checkpoints_dir(root)
    base.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(base)

    def fill(tmp: Path) -> None:
        from safetensors.torch import save_file

        if policy_state is None:  # every Policy saves itself; only the HunyuanVideo adapter takes a gathered state
            policy.save_pretrained(tmp / "transformer")
        else:
            policy.save_pretrained(tmp / "transformer", state=policy_state)
        if optimizer is not None:
            tensors, meta = optimizer_to_files(optimizer, optimizer_state)
            save_file(tensors, str(tmp / OPTIMIZER_TENSORS), metadata={"format": "pt"})
            (tmp / OPTIMIZER_META).write_text(json.dumps(meta, indent=1))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))

    path = atomic_write_dir(base / f"step-{int(step)}", fill)
    if keep is not None:
        prune_checkpoints(root, keep)
    return path


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; returns what was removed."""
    if keep < 1:
        raise CheckpointError(f"keep must be >= 1, got {keep}")
    found = list_checkpoints(root)
    removed = [path for _, path in found[:-keep]]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _read_json(file: Path, missing: str) -> Any:
    """A checkpoint's JSON file; a missing or malformed one is a CheckpointError naming it."""
    if not file.is_file():
        raise CheckpointError(f"{missing} ({file})")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from None


def read_state(path: str | Path) -> dict[str, Any]:
    return _read_json(Path(path) / STATE_FILE, f"not a checkpoint (no {STATE_FILE}): {Path(path)}")


def _safetensors_problem(file: Path) -> str | None:
    """Why a safetensors file is unreadable, from its header alone (``safetensors_header``: no tensor is loaded)."""
    from euphonium_ray.safetensors_header import safetensors_problem

    return safetensors_problem(file)


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why a step folder cannot be resumed from, or None: its state.json names its step, the transformer weights
    exist, the optimizer files come as a pair, and every JSON and safetensors file under it is whole. Reads file
    headers only, so checking a multi-GB checkpoint takes milliseconds. Files are named relative to the folder."""
    problem = _checkpoint_problem(Path(folder))
    return problem.replace(f"{Path(folder)}{os.sep}", "") if problem else None


def _checkpoint_problem(folder: Path) -> str | None:
    try:
        state = read_state(folder)
    except CheckpointError as exc:
        return str(exc)
    match = STEP_DIR.match(folder.name)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{folder / STATE_FILE} has no integer 'step'"
    if match and int(match.group(1)) != state["step"]:
        return f"{folder / STATE_FILE} says step {state['step']}, the folder name says {match.group(1)}"
    weights = folder / "transformer"
    if not (weights / WEIGHTS_NAME).is_file() and not (weights / WEIGHTS_INDEX_NAME).is_file():
        return f"{weights} holds no {WEIGHTS_NAME} (nor {WEIGHTS_INDEX_NAME})"
    if (folder / OPTIMIZER_TENSORS).is_file() != (folder / OPTIMIZER_META).is_file():
        return f"only one of {OPTIMIZER_TENSORS} and {OPTIMIZER_META} is there"
    for file in sorted(folder.rglob("*.json")):
        try:
            json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"{file} is not valid JSON ({exc})"
    for file in sorted(folder.rglob("*.safetensors")):
        problem = _safetensors_problem(file)
        if problem:
            return problem
    return None


def resolve_checkpoint(root_or_path: str | Path, which: str = "latest",
                       on_skip: Callable[[Path, str], None] | None = None) -> Path:
    """``which="latest"``: the newest checkpoint under a run folder that passes ``checkpoint_problem``; each newer
    one that does not is reported through ``on_skip(folder, why)`` and passed over. Otherwise ``root_or_path`` is a
    step folder, which must pass the same check."""
    if which != "latest":
        folder = Path(root_or_path)
        problem = checkpoint_problem(folder)
        if problem:
            raise CheckpointError(f"cannot resume from {folder}: {problem}")
        return folder
    found = list_checkpoints(root_or_path)
    if not found:
        raise CheckpointError(f"no checkpoint under {checkpoints_dir(root_or_path)}")
    skipped = []
    for _, folder in reversed(found):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        skipped.append(f"{folder.name} ({problem})")
        if on_skip is not None:
            on_skip(folder, problem)
    raise CheckpointError(f"no complete checkpoint under {checkpoints_dir(root_or_path)}: " + "; ".join(skipped))


def restart_checkpoint(root: str | Path, first: int, last: int, run_hash: str) -> Path | None:
    """Where a restarted learner resumes: the newest checkpoint under ``root`` with a step in ``first..last`` that
    this run wrote (its ``config_hash`` is ``run_hash``) and that passes ``checkpoint_problem``; None if there is none.
    Newer ones are left alone: their steps were not taken by the driver yet, and the replay writes them again."""
    for step, folder in reversed(list_checkpoints(root)):
        if first <= step <= last and checkpoint_problem(folder) is None and read_state(folder).get("config_hash") == run_hash:
            return folder
    return None


def load_checkpoint(
    path: str | Path,
    policy: Any | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Restore a step folder into ``policy`` and ``optimizer`` (either may be None); returns the run state."""
    folder = Path(path)
    state = read_state(folder)
    if policy is not None:
        tdir = folder / "transformer"
        if hasattr(policy, "load_pretrained"):
            policy.load_pretrained(tdir)
        else:
            policy.load_sync_state_dict(read_transformer_weights(tdir))
    if optimizer is not None:
        optimizer.load_state_dict(read_optimizer_state(folder, optimizer))
    return state
