"""Tensors across Ray's object store as numpy arrays: written once, read back without a copy.

Ray pickles a ``torch.Tensor`` through torch's own serialisation (a byte copy on ``put`` and another on ``get``:
about 0.5 s per 128 MB hop on the toy world's 128-video trajectory), while a numpy array goes out of band into
shared memory and comes back as a zero-copy view. ``pack`` turns every tensor inside dicts, lists and tuples into
a :class:`Packed` numpy payload (bf16 and other dtypes numpy lacks travel as same-width integers); ``unpack``
turns them back, straight onto ``device`` when one is given (one host-to-device copy out of shared memory), else
as writable CPU tensors (a copy: an object-store view is read-only, and torch code may write in place), or, for a
reader that never writes into them (``writable=False``: the driver reading a rollout), as views without a copy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["Packed", "pack", "unpack"]

# dtypes numpy has no equivalent of: carried as an integer view of the same width
_VIEW_AS = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}


@dataclass(frozen=True)
class Packed:
    """One tensor's bytes as a numpy array (what Ray stores out of band) and its torch dtype."""

    array: np.ndarray
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def tensor(self, device: torch.device | str | None = None, writable: bool = True) -> Tensor:
        with warnings.catch_warnings():  # a read-only view: copied below unless it goes to another device
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(self.array)
        dtype = getattr(torch, self.dtype)
        if device is not None and torch.device(device).type != "cpu":
            t = t.to(device, non_blocking=False)
            return t.view(dtype) if t.dtype != dtype else t
        t = t.clone() if writable and not self.array.flags.writeable else t
        return t.view(dtype) if t.dtype != dtype else t


def _pack_tensor(t: Tensor) -> Packed:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    carrier = _VIEW_AS.get(t.dtype)
    array = (t.view(carrier) if carrier is not None else t).numpy()
    return Packed(array, str(t.dtype).removeprefix("torch."))


def pack(obj: Any) -> Any:
    """``obj`` with every tensor (inside dicts, lists and tuples) replaced by its :class:`Packed` form."""
    if isinstance(obj, Tensor):
        return _pack_tensor(obj)
    if isinstance(obj, dict):
        return {k: pack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(pack(v) for v in obj)
    return obj


def unpack(obj: Any, device: torch.device | str | None = None, *, writable: bool = True) -> Any:
    """The inverse of :func:`pack`: tensors on ``device`` (None: CPU tensors, copied out of the object store unless
    ``writable=False``); anything else as it is."""
    if isinstance(obj, Packed):
        return obj.tensor(device, writable)
    if isinstance(obj, dict):
        return {k: unpack(v, device, writable=writable) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(unpack(v, device, writable=writable) for v in obj)
    return obj
