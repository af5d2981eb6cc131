"""The toy world's latent space: an exact, invertible pixel-unshuffle standing in for a trained VAE.

Encode: each frame (3, H, W) is cut into non-overlapping f×f pixel blocks; block (i, j) becomes one latent pixel
whose ``3·f²`` channels are the block's values (``torch.nn.functional.pixel_unshuffle`` channel order: colour
channel major, then row, then column inside the block). Frames are kept one-to-one (no temporal compression).
The values are then normalised by a fixed affine map, ``z = (u − shift)·scale``, so the DiT sees latents of
roughly zero mean and unit variance (the world is mostly black background).

Decode is the exact inverse: ``u = z/scale + shift`` then ``pixel_shuffle``. Up to float rounding (one
multiply and one add each way) decode(encode(x)) = x, and encode(decode(z)) = z.

Written as ``vae/config.json`` with ``_class_name: "PixelUnshuffleCodec"`` so ``models.codecs.load_codec``
dispatches to it like any other codec.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor

CLASS_NAME = "PixelUnshuffleCodec"


class PixelUnshuffleCodec:
    """Pixels (B, 3, F, H, W) in [-1, 1] <-> latents (B, 3·f², F, H/f, W/f)."""

    def __init__(self, factor: int, shift: float = 0.0, scale: float = 1.0, channels: int = 3) -> None:
        if factor < 1:
            raise ValueError(f"PixelUnshuffleCodec: factor must be >= 1, got {factor}")
        if scale == 0:
            raise ValueError("PixelUnshuffleCodec: scale must be non-zero")
        self.factor = int(factor)
        self.shift = float(shift)
        self.scale = float(scale)
        self.channels = int(channels)
        self.latent_channels = self.channels * self.factor**2

    # ------------------------------------------------------------------------------------------- config
    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "PixelUnshuffleCodec":
        """From a parsed ``vae/config.json``; a missing or wrong key is named in the error."""
        name = config.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise ValueError(f"codec config describes {name!r}, not {CLASS_NAME}")
        if "factor" not in config:
            raise ValueError(f"{CLASS_NAME} config has no 'factor'")
        try:
            return cls(
                factor=int(config["factor"]),
                shift=float(config.get("shift", 0.0)),
                scale=float(config.get("scale", 1.0)),
                channels=int(config.get("channels", 3)),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{CLASS_NAME} config is invalid: {exc}") from None

    @classmethod
    def from_folder(cls, config: dict[str, Any], folder: str | Path, **_: Any) -> "PixelUnshuffleCodec":
        """The ``registry.CODECS`` factory (the transform has no weights: dtype and device do not apply)."""
        return cls.from_config(config)

    def to_config(self) -> dict[str, Any]:
        return {
            "_class_name": CLASS_NAME,
            "factor": self.factor,
            "shift": self.shift,
            "scale": self.scale,
            "channels": self.channels,
            "latent_channels": self.latent_channels,
        }

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``folder/config.json`` (the codec has no weights)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.to_config(), indent=2) + "\n")
        return folder

    # ---------------------------------------------------------------------------------------- transform
    def encode(self, video: Tensor) -> Tensor:
        if video.ndim != 5 or video.shape[1] != self.channels:
            raise ValueError(f"expected video of shape (B, {self.channels}, F, H, W), got {tuple(video.shape)}")
        b, c, f, h, w = video.shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"frame size {h}x{w} is not divisible by the unshuffle factor {self.factor}")
        frames = video.transpose(1, 2).reshape(b * f, c, h, w)
        u = F.pixel_unshuffle(frames, self.factor)
        u = u.reshape(b, f, self.latent_channels, h // self.factor, w // self.factor).transpose(1, 2)
        return (u - self.shift) * self.scale

    def decode(self, latents: Tensor) -> Tensor:
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected latents of shape (B, {self.latent_channels}, T, h, w), got {tuple(latents.shape)}"
            )
        b, c, t, h, w = latents.shape
        u = latents / self.scale + self.shift
        frames = u.transpose(1, 2).reshape(b * t, c, h, w)
        x = F.pixel_shuffle(frames, self.factor)
        return x.reshape(b, t, self.channels, h * self.factor, w * self.factor).transpose(1, 2)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        if height % self.factor or width % self.factor:
            raise ValueError(f"frame size {height}x{width} is not divisible by the unshuffle factor {self.factor}")
        return (self.latent_channels, num_frames, height // self.factor, width // self.factor)

    def num_frames(self, latent_frames: int) -> int:
        return latent_frames
