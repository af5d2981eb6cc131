"""Euphonium-Ray: online RL for text-to-video flow matching on Ray."""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

_CHECKOUT = Path(__file__).resolve().parent.parent
# subpackages whose files live in the checkout's top-level folders (pyproject's package-dir maps them on install)
_TOP_LEVEL = {"euphonium_ray.actors": _CHECKOUT / "actors", "euphonium_ray.configs": _CHECKOUT / "configs"}


class _SourceCheckoutFolders:
    """The Ray actors live in the checkout's top-level ``actors/`` folder and the run configs in ``configs/``; they
    install as ``euphonium_ray.actors`` and ``euphonium_ray.configs`` (pyproject's package-dir), never as a generic
    top-level ``actors``. A checkout used through ``PYTHONPATH`` alone (the GPU machines' set-up) has no install to
    map them: this finder does, for those two names only."""

    @staticmethod
    def find_spec(name: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        folder = _TOP_LEVEL.get(name)
        if folder is None or not folder.is_dir():
            return None
        init = folder / "__init__.py"
        if init.is_file():
            return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(folder)])
        spec = ModuleSpec(name, None, is_package=True)  # a folder of data files (configs/): a namespace package
        spec.submodule_search_locations = [str(folder)]
        return spec


if not any(f is _SourceCheckoutFolders for f in sys.meta_path):
    sys.meta_path.append(_SourceCheckoutFolders)  # type: ignore[arg-type]
