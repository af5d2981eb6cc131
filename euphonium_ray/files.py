"""Writing a file so that a reader never sees half of it, and reading a YAML mapping with one-line errors: the one
copy of each that the config, the benchmarks, the dashboards and preprocessing use."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import yaml

from euphonium_ray.errors import ConfigError

__all__ = ["read_yaml_mapping", "write_atomic"]


def write_atomic(path: str | Path, content: str | bytes | Callable[[BinaryIO], Any], *,
                 mode: int | None = None) -> None:
    """Write ``content`` (text as UTF-8, bytes, or a ``write(fileobj)`` callback) into a temporary file beside
    ``path``, fsync it, then rename it over ``path``; ``mode``: the file's permissions (a temporary file is 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode("utf-8") if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_yaml_mapping(path: str | Path, what: str, *, empty: str | None = None) -> dict[str, Any]:
    """The mapping at the top of the YAML file ``path`` (``what`` names it in errors). An empty file is ``{}``, or a
    ConfigError saying ``empty`` when that is given."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        tree = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {p} is not valid YAML: {exc}") from None
    if tree is None:
        if empty is not None:
            raise ConfigError(f"{what} {p} is empty {empty}")
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{what} {p} must hold a mapping at the top level")
    return tree
