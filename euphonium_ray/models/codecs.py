"""Latent codecs: pixels (B, 3, F, H, W) in [-1, 1] <-> the DiT's scaled latents (B, C, T, h, w).

``load_codec(folder)`` reads ``folder/config.json`` and looks its ``_class_name`` up in ``registry.CODECS``, so a model
folder says which codec it needs: HunyuanVideo's causal VAE (diffusers ``AutoencoderKLHunyuanVideo``) for real
models, the toy world's exact pixel-unshuffle transform (registered by name; this module never imports the toy
world), or anything a plugin registers with ``CODECS.register(class_name, factory)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from euphonium_ray.models.base import LatentCodec
from euphonium_ray.registry import CODECS
from euphonium_ray.errors import EuphoniumError


class CodecError(EuphoniumError, ValueError):
    """A codec folder that cannot be loaded; the message names the file."""


def read_codec_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CodecError(f"codec config not found: {path}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CodecError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or "_class_name" not in config:
        raise CodecError(f"{path} has no '_class_name'; cannot tell which codec it describes")
    return config


def load_codec(
    folder: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LatentCodec:
    """The codec a folder describes (``vae/`` of a model folder). Unknown ``_class_name`` → error naming the file."""
    folder = Path(folder)
    config = read_codec_config(folder)
    name = config["_class_name"]
    if name not in CODECS:
        raise CodecError(f"{folder / 'config.json'}: unknown codec class {name!r}; known: {', '.join(CODECS.names())}")
    return CODECS.get(name)(config, folder, dtype=dtype, device=device)


class HunyuanVAECodec:
    """diffusers' HunyuanVideo causal VAE as a codec: latents are ``mean(z)·scaling_factor`` (0.476986 upstream).

    Decoding divides by the factor and runs the VAE with tiling on (upstream decodes 480² videos tiled); on GPU it
    runs under bf16 autocast with fp32 weights, as upstream does. Outputs are clamped to [-1, 1].
    """

    def __init__(self, vae, *, tiling: bool = True, sample_posterior: bool = False) -> None:
        self.vae = vae.eval()
        self.vae.requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.latent_channels = int(vae.config.latent_channels)
        self.spatial_ratio = int(vae.config.spatial_compression_ratio)
        self.temporal_ratio = int(vae.config.temporal_compression_ratio)
        self.sample_posterior = sample_posterior
        if tiling:
            self.vae.enable_tiling()

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> "HunyuanVAECodec":
        from diffusers import AutoencoderKLHunyuanVideo

        vae = AutoencoderKLHunyuanVideo.from_pretrained(folder, torch_dtype=dtype)
        return cls(vae.to(device), **kwargs)

    @classmethod
    def from_folder(cls, config: dict[str, Any], folder: str | Path, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> "HunyuanVAECodec":
        """The ``registry.CODECS`` factory: a ``vae/`` folder in diffusers' layout."""
        return cls.from_pretrained(folder, dtype=dtype, device=device)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "HunyuanVAECodec":
        self.vae.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def _autocast(self):
        dev = self.device
        enabled = dev.type == "cuda"
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=enabled)

    @torch.no_grad()
    def encode(self, video: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected video of shape (B, 3, F, H, W), got {tuple(video.shape)}")
        param_dtype = next(self.vae.parameters()).dtype
        with self._autocast():
            dist = self.vae.encode(video.to(self.device, param_dtype)).latent_dist
            z = dist.sample(generator) if self.sample_posterior else dist.mode()
        return z.float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected latents of shape (B, {self.latent_channels}, T, h, w), got {tuple(latents.shape)}"
            )
        param_dtype = next(self.vae.parameters()).dtype
        with self._autocast():
            video = self.vae.decode(latents.to(self.device, param_dtype) / self.scaling_factor).sample
        return video.float().clamp(-1.0, 1.0)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T, h, w) with ``T = (F−1)//4 + 1`` (causal: the first frame alone), ``h = H//8``, ``w = W//8``."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if height % self.spatial_ratio or width % self.spatial_ratio:
            raise ValueError(f"height and width must be multiples of {self.spatial_ratio}, got {height}x{width}")
        t = (num_frames - 1) // self.temporal_ratio + 1
        return (self.latent_channels, t, height // self.spatial_ratio, width // self.spatial_ratio)

    def num_frames(self, latent_frames: int) -> int:
        """How many frames a decode of ``latent_frames`` latent frames gives: ``4·(T−1)+1``."""
        return self.temporal_ratio * (latent_frames - 1) + 1

