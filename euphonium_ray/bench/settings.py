"""What the convergence benchmark measures and how: method configs layered on one base, plus the measuring settings.

Every method is a YAML file that ``extends`` the shared ``base.yaml`` (which may itself extend the toy world's
config). Budgets (steps, prompts per step, group size, sampling steps, learning rate) and task difficulty live in the
base only, so the methods cannot differ in them; ``check_shared_budget`` enforces that after merging. The measuring
instrument (held-out prompts, evaluation cadence, seeds, smoothing) lives in ``benchmark.yaml`` as
:class:`BenchmarkSettings`.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from euphonium_ray.config import ConfigError, RunConfig, load_config
from euphonium_ray.files import read_yaml_mapping

EXTENDS_KEY = "extends"
SETTINGS_FILE = "benchmark.yaml"
# Keys every method must share with the baseline: the budget and the task. A method file that changes one is an error.
SHARED_KEYS: tuple[str, ...] = (
    "steps",
    "seed",
    "model",
    "data",
    "toy",
    "sampler.num_steps",
    "sampler.shift",
    "sampler.group_size",
    "sampler.same_initial_noise",
    "rewards.orm",
    "optim.lr",
    "optim.weight_decay",
    "optim.betas",
    "optim.grad_clip",
    "optim.clip_range",
    "optim.timestep_fraction",
    "optim.grad_accum",
    "optim.epochs",
)


class QuickSettings(BaseModel):
    """A CI-sized run: checks that the pipeline runs and its numbers are well-formed, not who wins."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=2, ge=1)
    eval_every: int = Field(default=1, ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0])
    heldout_prompts: int = Field(default=2, ge=1)
    eval_samples_per_prompt: int = Field(default=1, ge=1)
    workers: int = Field(default=1, ge=1)
    sets: list[str] = Field(default_factory=list)  # --set style overrides applied to every method


class TaskSettings(BaseModel):
    """One reward task of the suite: its outcome reward (``registry.ORMS``), its trained latent PRM folder, and the
    held-out gain the baseline must reach within the budget for the task to count as climbable."""

    model_config = ConfigDict(extra="forbid")

    orm: str
    prm: str = ""  # trained by `euphonium-ray train-prm --orm <orm>`; empty: the world's default PRM
    bar: float = 0.10


class ClaimSettings(BaseModel):
    """The claim statistic (bench/PROTOCOL.md): steps until the held-out reward first reaches
    ``start + target_fraction · (baseline's final gain)``, linearly interpolated between evaluations, compared as
    the ratio of medians over seeds, with a paired bootstrap interval over seeds."""

    model_config = ConfigDict(extra="forbid")

    target_fraction: float = Field(default=0.8, gt=0, le=1)
    bootstrap: int = Field(default=10000, ge=100)
    confidence: float = Field(default=0.95, gt=0, lt=1)
    bootstrap_seed: int = 20261202


class BenchmarkSettings(BaseModel):
    """The measuring instrument, identical for all methods."""

    model_config = ConfigDict(extra="forbid")

    methods: list[str]
    tasks: dict[str, TaskSettings] = Field(default_factory=lambda: {"caption": TaskSettings(orm="toy-caption")})
    claim: ClaimSettings = ClaimSettings()
    baseline: str = "dance-grpo"
    candidate: str = "euphonium"
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    eval_every: int = Field(default=5, ge=1)  # K: held-out ODE evaluation every K training steps (and at 0 and the end)
    heldout_prompts: int = Field(default=8, ge=1)  # prompts of the world kept out of RL training
    heldout_seed: int = 7
    eval_samples_per_prompt: int = Field(default=2, ge=1)
    eval_seed: int = 1234  # fixed initial noise of the held-out ODE samples (same for every method, step and seed)
    smoothing: int = Field(default=5, ge=1)  # trailing moving-average window over the per-step training reward
    threads: int = Field(default=1, ge=1)  # torch intra-op threads per in-process runner process
    workers: int = Field(default=1, ge=1)  # in-process runner processes (the runs are dealt over them)
    quick: QuickSettings = QuickSettings()

    @model_validator(mode="after")
    def _compared_methods_are_run(self) -> "BenchmarkSettings":
        if not self.tasks:
            raise ValueError("tasks must name at least one reward task")
        if not self.methods:
            raise ValueError("methods must name at least one method")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods lists a method twice: {self.methods}")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")
        return self


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, recursing into mappings (lists and scalars are replaced)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML file with its ``extends`` chain merged in (parents first; paths relative to the extending file)."""
    file = Path(path).resolve()
    if file in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, file))
        raise ConfigError(f"benchmark configs extend each other in a cycle: {chain}")
    tree = read_yaml_mapping(file, "benchmark config")
    parent = tree.pop(EXTENDS_KEY, None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise ConfigError(f"{file}: '{EXTENDS_KEY}' must be a path to another YAML file, got {parent!r}")
    return deep_merge(resolve_tree(file.parent / parent, (*_seen, file)), tree)


def task_overrides(task: TaskSettings) -> list[str]:
    """The ``--set`` overrides that point a method's config at a task (its reward and its PRM)."""
    sets = [f"rewards.orm.backend={task.orm}"]
    if task.prm:
        sets.append(f"rewards.prm.path={task.prm}")
    return sets


def load_method_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The RunConfig of one method: its ``extends`` chain merged, then ``--set`` overrides, validated as usual."""
    tree = resolve_tree(path)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(tree, fh, sort_keys=False)
        merged = Path(fh.name)
    try:
        return load_config(merged, overrides or [], use_env=False)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    finally:
        merged.unlink(missing_ok=True)


def load_settings(configs_dir: str | Path) -> BenchmarkSettings:
    path = Path(configs_dir) / SETTINGS_FILE
    try:
        return BenchmarkSettings.model_validate(read_yaml_mapping(path, "benchmark config"))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"{path}: {problems}") from None


def method_file(configs_dir: str | Path, method: str) -> Path:
    path = Path(configs_dir) / f"{method}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(configs_dir).glob("*.yaml") if p.stem not in ("base", "benchmark"))
        raise ConfigError(f"unknown method {method!r}: no {path}; known methods: {', '.join(known)}")
    return path


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def check_shared_budget(configs: dict[str, RunConfig]) -> None:
    """Every method must have the same budget and task (SHARED_KEYS); the error names method, key and values."""
    if not configs:
        return
    dumps = {m: c.model_dump(mode="json") for m, c in configs.items()}
    first, ref = next(iter(dumps.items()))
    for method, tree in dumps.items():
        for key in SHARED_KEYS:
            if _get(tree, key) != _get(ref, key):
                raise ConfigError(
                    f"method {method!r} changes the shared budget/task key '{key}' "
                    f"({_get(tree, key)!r} vs {_get(ref, key)!r} in {first!r}); set it in base.yaml only"
                )
