"""Euphonium-Ray: online RL for text-to-video flow matching on Ray."""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

_ACTORS = Path(__file__).resolve().parent.parent / "actors"


class _SourceCheckoutActors:
    """The Ray actors live in the checkout's top-level ``actors/`` folder and install as ``euphonium_ray.actors``
    (pyproject's package-dir). A checkout used through ``PYTHONPATH`` alone (the GPU machines' set-up) has no
    install to map it: this finder does, and only for that one name."""

    @staticmethod
    def find_spec(name: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if name != "euphonium_ray.actors":
            return None
        return importlib.util.spec_from_file_location(name, _ACTORS / "__init__.py",
                                                      submodule_search_locations=[str(_ACTORS)])


if (_ACTORS / "__init__.py").is_file() and not any(isinstance(f, _SourceCheckoutActors) or f is _SourceCheckoutActors
                                                  for f in sys.meta_path):
    sys.meta_path.append(_SourceCheckoutActors)  # type: ignore[arg-type]
