"""What a safetensors file holds, read from its header alone: tensor names, dtypes and shapes, and whether the file
is whole. No tensor is loaded, so checking a multi-GB model folder takes milliseconds.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, data offsets,
plus an optional ``__metadata__``), then the tensor bytes. A whole file is exactly 8 + header + the largest data
end offset bytes long: a truncated download, a disk that filled up mid-write or a file overwritten in place gives
another size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HeaderError", "SafetensorsHeader", "read_header", "safetensors_problem"]

METADATA_KEY = "__metadata__"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors itself refuses larger headers


class HeaderError(ValueError):
    """A safetensors file whose header cannot be read or does not describe the file; the message names the file."""


@dataclass(frozen=True)
class SafetensorsHeader:
    """The tensors one file holds: name -> (dtype, shape)."""

    path: Path
    tensors: dict[str, tuple[str, tuple[int, ...]]]

    @property
    def keys(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]


def read_header(path: str | Path) -> SafetensorsHeader:
    """The header of ``path``; raises HeaderError (naming the file) when it is missing, unreadable or its size is
    not what the header describes."""
    file = Path(path)
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            prefix = fh.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
                raise HeaderError(f"{file} is truncated ({size} bytes, shorter than its header)")
            header = json.loads(fh.read(length))
        if not isinstance(header, dict):
            raise TypeError("the header is not a JSON object")
        tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
        end = 0
        for name, entry in header.items():
            if name == METADATA_KEY:
                continue
            tensors[name] = (str(entry["dtype"]), tuple(int(s) for s in entry["shape"]))
            end = max(end, int(entry["data_offsets"][1]))
    except FileNotFoundError:
        raise HeaderError(f"{file} does not exist") from None
    except HeaderError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise HeaderError(f"{file} has no readable safetensors header ({type(exc).__name__}: {exc})") from None
    expected = 8 + length + end
    if size != expected:
        raise HeaderError(f"{file} is {size} bytes but its header describes {expected} (truncated or overwritten)")
    return SafetensorsHeader(file, tensors)


def safetensors_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a whole safetensors file, or None."""
    try:
        read_header(path)
    except HeaderError as exc:
        return str(exc)
    return None
