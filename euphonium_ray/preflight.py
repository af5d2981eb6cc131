"""The files a run will load, checked on the driver before Ray or any actor starts.

A truncated weights file, a checkpoint with a key too many or too few, or a PRM folder of another architecture
would otherwise fail inside an actor, minutes later, as a long Ray traceback. Here each is one line naming the file
and what is wrong, found from safetensors headers and config files alone (``safetensors_header``: no tensor is
read) and from the models built on the meta device (nothing allocated). Files that are missing are left to the
checks that already name them (``driver.prepare_inputs``, ``checkpoint.resolve_checkpoint``).

What is checked: the policy (``model.path``: transformer class and weights against its config, the codec's
weights), ``model.checkpoint`` (exactly the base transformer's keys and shapes), the ``--resume`` folder (its
transformer weights, or under LoRA its adapter, against the model), the latent PRM (``rewards.prm.path``: its
architecture against ``rewards.prm.kind``, its weights against its config) and the ORM's weights folder
(``rewards.orm.path``: every safetensors file whole, the index consistent with its shards).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from euphonium_ray.config import RunConfig
from euphonium_ray.errors import EuphoniumError
from euphonium_ray.safetensors_header import HeaderError, read_header

__all__ = ["PreflightError", "check_run_files", "run_file_problems"]

Shapes = dict[str, tuple[int, ...]]
TRANSFORMER_WEIGHTS = "diffusion_pytorch_model.safetensors"
LORA_ADAPTER = "lora/pytorch_lora_weights.safetensors"
KEYS_SHOWN = 5


class PreflightError(EuphoniumError, ValueError):
    """Files a run cannot load; one line per problem, each naming the file."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def check_run_files(cfg: RunConfig, resume: str | Path | None = None) -> None:
    """Raise PreflightError listing every problem ``run_file_problems`` finds."""
    problems = run_file_problems(cfg, resume)
    if problems:
        raise PreflightError(problems)


def run_file_problems(cfg: RunConfig, resume: str | Path | None = None) -> list[str]:
    """One line per problem in the files the run ``cfg`` (resuming from the step folder ``resume``) would load."""
    problems: list[str] = []
    model = _policy_expectations(cfg, problems)
    if cfg.model.checkpoint:
        _check_transformer_weights(Path(cfg.model.checkpoint), model, "model.checkpoint", problems)
    if resume:
        _check_resume(Path(resume), cfg, model, problems)
    _check_prm(cfg, problems)
    if cfg.rewards.orm.enabled and cfg.rewards.orm.path:
        _check_weights_folder(Path(cfg.rewards.orm.path), "rewards.orm.path", problems)
    return problems


# ------------------------------------------------------------------------------------------------ policy
class _Model:
    """What the base transformer's weights must be: None where its config could not be read or the family
    cannot say (a plugin policy without ``expected_weights``)."""

    def __init__(self, config: dict[str, Any] | None, weights: Shapes | None, family: Any) -> None:
        self.config, self.weights, self.family = config, weights, family


def _policy_expectations(cfg: RunConfig, problems: list[str]) -> _Model:
    from euphonium_ray.registry import POLICIES

    root = Path(cfg.model.path)
    family = POLICIES.get(cfg.model.family)
    config_file = root / "transformer" / "config.json"
    if not config_file.is_file():  # a missing folder or file is named by prepare_inputs (the toy world builds it)
        return _Model(None, None, family)
    config = _read_json(config_file, problems)
    if config is None:
        return _Model(None, None, family)
    wanted = getattr(family, "transformer_class_name", None)
    named = _class_named(config)
    if wanted and named != wanted:
        problems.append(f"{config_file} names architecture {named!r}, but model.family {cfg.model.family!r} loads "
                        f"a {wanted}")
        return _Model(None, None, family)
    expected = _expected(lambda: family.expected_weights(config), config_file, problems) \
        if hasattr(family, "expected_weights") else None
    model = _Model(config, expected, family)
    _check_transformer_weights(root / "transformer", model, "model.path", problems, exact=False,
                               against="its config.json (a missing tensor would be initialised at random)")
    vae = root / "vae"
    if vae.is_dir():
        _check_weights_folder(vae, "model.path", problems)
    return model


def _check_transformer_weights(location: Path, model: _Model, key: str, problems: list[str], *, exact: bool = True,
                               against: str = "the transformer of model.path") -> None:
    """A transformer given as a file, a diffusers folder (single file or sharded) or a folder holding
    ``transformer/``; ``exact``: the key set must equal the model's (a checkpoint loaded strictly), else only
    missing keys and wrong shapes count (diffusers ignores extra tensors in a base model)."""
    if location.is_dir() and not _has_weights(location) and (location / "transformer").is_dir():
        location = location / "transformer"
    if location.is_dir() and not _has_weights(location):
        if location.exists() and key != "model.path":
            problems.append(f"{location} holds no {TRANSFORMER_WEIGHTS} (nor its index) ({key})")
        return
    if not location.exists():
        return  # named by the loader's own check
    file = _weights_file(location)
    found = _read_sharded(file, key, problems) if file.name.endswith(".index.json") else \
        _read_weights(file, key, problems)
    if found is not None and model.weights is not None:
        _compare(found, model.weights, file, key, against, problems, exact=exact)


def _has_weights(folder: Path) -> bool:
    return (folder / TRANSFORMER_WEIGHTS).is_file() or (folder / f"{TRANSFORMER_WEIGHTS}.index.json").is_file()


def _weights_file(location: Path) -> Path:
    """The file a message names: the weights file itself, or a sharded folder's index."""
    if location.is_dir():
        for name in (TRANSFORMER_WEIGHTS, f"{TRANSFORMER_WEIGHTS}.index.json"):
            if (location / name).is_file():
                return location / name
    return location


# ------------------------------------------------------------------------------------------------ resume
def _check_resume(folder: Path, cfg: RunConfig, model: _Model, problems: list[str]) -> None:
    """What the learner restores: the full transformer, or under LoRA the adapter alone (``load_pretrained``)."""
    tdir = folder / "transformer"
    if cfg.model.trainable != "lora":
        _check_transformer_weights(tdir, model, "--resume", problems)
        return
    adapter = tdir / LORA_ADAPTER
    if not adapter.is_file():
        problems.append(f"{adapter} does not exist: --resume needs a checkpoint of a LoRA run for "
                        "model.trainable=lora (this one holds full weights only)")
        return
    found = _read_weights(adapter, "--resume", problems)
    if found is None or model.config is None or not hasattr(model.family, "expected_weights"):
        return
    expected = _expected(lambda: model.family.expected_weights(model.config, lora_rank=cfg.model.lora_rank,
                                                                lora_alpha=cfg.model.lora_alpha), adapter, problems)
    if expected is not None:
        _compare(found, expected, adapter, "--resume", f"the rank-{cfg.model.lora_rank} LoRA adapter that "
                 "model.lora_rank asks for", problems)


# --------------------------------------------------------------------------------------------------- PRM
def _check_prm(cfg: RunConfig, problems: list[str]) -> None:
    """A latent PRM folder is loaded for guidance (``rgg``) or the latent outcome reward."""
    from euphonium_ray.registry import PRMS, RegistryError

    p = cfg.rewards.prm
    if p.kind != "latent" or not p.path or not (cfg.rgg.enabled or cfg.rewards.latent_outcome):
        return
    folder = Path(p.path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        return  # named by prepare_inputs
    config = _read_json(config_file, problems)
    if config is None:
        return
    try:
        prm_class = PRMS.component_class(p.kind)
    except RegistryError:
        return
    named = _class_named(config)
    if named != prm_class.__name__:
        problems.append(f"{config_file} names architecture {named!r}, but rewards.prm.kind {p.kind!r} loads a "
                        f"{prm_class.__name__} (is rewards.prm.path the PRM folder?)")
        return
    weights = folder / "model.safetensors"
    found = _read_weights(weights, "rewards.prm.path", problems) if weights.is_file() else None
    if found is None or not hasattr(prm_class, "expected_weights"):
        return
    expected = _expected(lambda: prm_class.expected_weights(folder), config_file, problems)
    if expected is not None:
        _compare(found, expected, weights, "rewards.prm.path", f"its {config_file.name}", problems)


# ------------------------------------------------------------------------------------------------ helpers
def _read_json(file: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{file} is not valid JSON ({exc})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{file} does not hold a JSON object")
        return None
    return data


def _class_named(config: dict[str, Any]) -> str | None:
    """The architecture a config names: diffusers' ``_class_name``, else transformers' ``architectures[0]``."""
    if isinstance(config.get("_class_name"), str):
        return config["_class_name"]
    archs = config.get("architectures")
    return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None


def _expected(build: Callable[[], Shapes], config_file: Path, problems: list[str]) -> Shapes | None:
    """The expected weights, or a problem naming the config that cannot build the model."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - a config the model class refuses: one line naming the file
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        problems.append(message if str(config_file) in message else
                        f"{config_file}: cannot build the model it describes ({type(exc).__name__}: {message})")
        return None


def _read_weights(file: Path, key: str, problems: list[str]) -> Shapes | None:
    """Names and shapes in one safetensors file; None after a problem."""
    try:
        header = read_header(file)
    except HeaderError as exc:
        problems.append(f"{exc} ({key})")
        return None
    return {name: shape for name, (_, shape) in header.tensors.items()}


def _read_sharded(index: Path, key: str, problems: list[str]) -> Shapes | None:
    data = _read_json(index, problems)
    weight_map = data.get("weight_map") if data is not None else None
    if not isinstance(weight_map, dict):
        if data is not None:
            problems.append(f"{index} has no 'weight_map' ({key})")
        return None
    found: Shapes = {}
    whole = True
    for shard in sorted(set(weight_map.values())):
        file = index.parent / str(shard)
        if not file.is_file():
            problems.append(f"{file} does not exist, but {index.name} names it ({key})")
            whole = False
            continue
        shapes = _read_weights(file, key, problems)
        if shapes is None:
            whole = False
            continue
        listed = {name for name, where in weight_map.items() if where == shard}
        if listed - set(shapes):
            problems.append(f"{file} lacks {_names(listed - set(shapes))}, which {index.name} places in it ({key})")
            whole = False
        found.update(shapes)
    return found if whole else None


def _check_weights_folder(folder: Path, key: str, problems: list[str]) -> None:
    """Every safetensors file of a folder (or the file itself) whole; a sharded index consistent with its shards."""
    if folder.is_file():
        if folder.suffix == ".safetensors":
            _read_weights(folder, key, problems)
        return
    if not folder.is_dir():
        return
    indexed: set[Path] = set()
    for index in sorted(folder.glob("*.safetensors.index.json")):
        _read_sharded(index, key, problems)
        data = _read_json(index, []) or {}
        indexed |= {folder / str(s) for s in (data.get("weight_map") or {}).values()}
    for file in sorted(folder.glob("*.safetensors")):
        if file not in indexed:
            _read_weights(file, key, problems)


def _compare(found: Shapes, expected: Shapes, file: Path, key: str, against: str, problems: list[str], *,
             exact: bool = True) -> None:
    """One line: the keys missing from (and, when ``exact``, extra in) ``file`` and the wrong shapes."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected)) if exact else []
    shapes = [f"{k} {found[k]} vs {expected[k]}" for k in sorted(set(found) & set(expected)) if found[k] != expected[k]]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): {_names(missing)}")
    if extra:
        parts.append(f"{len(extra)} unexpected key(s): {_names(extra)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {_names(shapes)}")
    if parts:
        problems.append(f"{file} does not match {against} ({key}): " + "; ".join(parts))


def _names(items: Any) -> str:
    items = sorted(items)
    more = f" and {len(items) - KEYS_SHOWN} more" if len(items) > KEYS_SHOWN else ""
    return ", ".join(items[:KEYS_SHOWN]) + more
