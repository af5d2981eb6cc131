"""Component registries: one per kind of component, name -> factory, imported only when asked for.

DESIGN.md section 2: policy families, latent codecs, process reward models and outcome rewards (the reward tasks)
each resolve through exactly one registry here, and every caller (actors, ``generate``, ``train-prm``, the
benchmarks, ``bench/``) looks components up through it. Built-in entries are ``"module:attribute"`` strings, so a
registry costs no imports until an entry is used, and the toy world's parts are registered by name without
``models/`` ever importing ``toy/``.

A user brings a component without editing the package, in either of two ways:

* a module listed in the run config's ``plugins`` (imported before the config is validated) that calls
  ``ORMS.register("my-reward", MyReward.from_run_config)``;
* an installed distribution that declares a ``euphonium_ray.plugins`` entry point naming such a module.

Factory signatures, by registry:

* ``POLICIES``: a class with ``from_pretrained(path, **options)`` (see ``actors/common.py: load_policy``);
* ``CODECS``: ``factory(config: dict, folder: Path, *, dtype, device) -> LatentCodec`` keyed by the codec folder's
  ``_class_name``;
* ``PRMS``: ``factory(cfg: RunConfig, device, *, policy=None, codec=None) -> ProcessRewardModel``;
* ``ORMS``: ``factory(cfg: RunConfig, device) -> OutcomeRewardModel``.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any, Callable, Iterable
from euphonium_ray.errors import EuphoniumError

__all__ = ["CODECS", "ORMS", "POLICIES", "PRMS", "Registry", "RegistryError", "load_plugins", "plugin_dirs"]

ENTRY_POINT_GROUP = "euphonium_ray.plugins"


class RegistryError(EuphoniumError, ValueError):
    """An unknown component name, or an entry that cannot be imported; the message names both and the choices."""


class Registry:
    """Names -> factories of one kind of component; entries are objects or lazy ``"module:attribute"`` strings."""

    def __init__(self, kind: str, builtins: dict[str, str] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = dict(builtins or {})

    def register(self, name: str, target: Any = None, *, replace: bool = False) -> Any:
        """Add ``name``; ``target`` is a factory or a ``"module:attribute"`` path. Without ``target`` this is a
        decorator. Registering a taken name needs ``replace=True`` (a silent overwrite hides plugin clashes)."""
        if not name or not isinstance(name, str):
            raise RegistryError(f"a {self.kind} needs a non-empty string name, got {name!r}")

        def add(obj: Any) -> Any:
            if name in self._entries and not replace and self._entries[name] is not obj:
                raise RegistryError(f"{self.kind} {name!r} is already registered (pass replace=True to override)")
            self._entries[name] = obj
            return obj

        return add if target is None else add(target)

    def names(self) -> list[str]:
        _load_entry_points()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        _load_entry_points()
        return name in self._entries

    def get(self, name: str) -> Any:
        """The factory registered as ``name`` (importing its module on first use)."""
        _load_entry_points()
        if name not in self._entries:
            raise RegistryError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._entries))}")
        entry = self._entries[name]
        if isinstance(entry, str):
            entry = _import_target(entry, f"{self.kind} {name!r}")
            self._entries[name] = entry
        return entry

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def component_class(self, name: str) -> type:
        """The class behind ``name``: the entry itself when it is a class, else the class whose classmethod it is
        (``"module:LatentPRM.from_run_config"`` -> ``LatentPRM``). For callers that make a component another way
        than through its factory (``train-prm`` builds a fresh PRM from the policy's blocks)."""
        entry = self.get(name)
        owner = entry if isinstance(entry, type) else getattr(entry, "__self__", None)
        if not isinstance(owner, type):
            raise RegistryError(f"{self.kind} {name!r} is registered as {entry!r}, which is neither a class nor a "
                                "classmethod of one")
        return owner


def _import_target(path: str, what: str) -> Any:
    module_name, _, attr_path = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for attr in attr_path.split(".") if attr_path else []:
            obj = getattr(obj, attr)
    except (ImportError, AttributeError) as exc:
        raise RegistryError(f"{what} points at {path!r}, which cannot be imported: {exc}") from exc
    return obj


_ENTRY_POINTS_LOADED = False


def _load_entry_points() -> None:
    """Import every module named by an installed ``euphonium_ray.plugins`` entry point, once."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin names itself
            raise RegistryError(f"plugin entry point {ep.name!r} ({ep.value}) failed to load: {exc!r}") from exc


def load_plugins(modules: Iterable[str]) -> None:
    """Import the user's plugin modules (the run config's ``plugins``); each registers its components."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise RegistryError(f"plugin module {name!r} (config key 'plugins') cannot be imported: {exc}") from exc
        except RegistryError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's module: one line naming it and what it raised
            raise RegistryError(f"plugin module {name!r} (config key 'plugins') failed while importing: "
                                f"{type(exc).__name__}: {exc}") from exc


def plugin_dirs(modules: Iterable[str]) -> list[str]:
    """The folders the (already imported) plugin modules were found in, outside the interpreter's own
    site-packages: what a process started elsewhere (a Ray worker) needs on its path to import them too."""
    import site
    import sys
    from pathlib import Path

    own = {str(Path(p).resolve()) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    out: list[str] = []
    for name in modules:
        top = sys.modules.get(name.split(".")[0])
        if top is None:
            continue
        paths = list(getattr(top, "__path__", []))  # a package: its parent folder holds it
        origin = Path(paths[0]) if paths else Path(getattr(top, "__file__", "") or "")
        if not str(origin):
            continue
        folder = str(origin.resolve().parent)
        if folder not in own and folder not in out:
            out.append(folder)
    return out


POLICIES = Registry("policy family", {
    "hunyuanvideo": "euphonium_ray.models.hunyuan:HunyuanVideoPolicy",
    "toy": "euphonium_ray.models.hunyuan:HunyuanVideoPolicy",  # the toy world's policy is the real class, tiny
})

CODECS = Registry("latent codec", {
    "AutoencoderKLHunyuanVideo": "euphonium_ray.models.codecs:HunyuanVAECodec.from_folder",
    "PixelUnshuffleCodec": "euphonium_ray.toy.codec:PixelUnshuffleCodec.from_folder",
})

PRMS = Registry("process reward model", {
    "latent": "euphonium_ray.models.prm:LatentPRM.from_run_config",
    "oracle": "euphonium_ray.toy.oracle:OracleProcessReward.from_run_config",
})

ORMS = Registry("outcome reward", {
    "toy": "euphonium_ray.toy.rewards:caption_reward",  # caption faithfulness (the original toy judge)
    "toy-caption": "euphonium_ray.toy.rewards:caption_reward",
    "toy-centered": "euphonium_ray.toy.rewards:centered_reward",
    "toy-motion": "euphonium_ray.toy.rewards:motion_reward",
    "toy-prominence": "euphonium_ray.toy.rewards:prominence_reward",
    "toy-steady": "euphonium_ray.toy.rewards:steady_reward",
    "solireward": "euphonium_ray.models.orm_solireward:SoliRewardORM.from_run_config",
    "vllm": "euphonium_ray.models.orm_vllm:VLLMJudgeORM.from_run_config",
})

Factory = Callable[..., Any]
