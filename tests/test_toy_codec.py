"""The toy latent space: an exact, invertible pixel-unshuffle behind the LatentCodec interface."""

from __future__ import annotations

import json

import pytest
import torch

from euphonium_ray.config import ToyConfig
from euphonium_ray.models.base import LatentCodec
from euphonium_ray.models.codecs import CodecError, load_codec
from euphonium_ray.toy.codec import PixelUnshuffleCodec
from euphonium_ray.toy.data import ShapesWorld


def test_pixels_to_latents_and_back_is_exact_on_world_videos_and_random_values() -> None:
    codec = PixelUnshuffleCodec(4, shift=-0.9, scale=2.5)
    world = ShapesWorld(ToyConfig())
    videos = torch.cat([world.videos(world.prompts, seed=0), torch.rand(4, 3, 8, 24, 24) * 2 - 1])
    latents = codec.encode(videos)
    assert latents.shape == (52, 48, 8, 6, 6)
    assert (codec.decode(latents) - videos).abs().max() < 1e-6
    z = torch.randn(3, 48, 8, 6, 6)
    assert (codec.encode(codec.decode(z)) - z).abs().max() < 1e-5


def test_latent_channel_holds_the_documented_pixel() -> None:
    """Channel c·f² + i·f + j of latent pixel (p, q) is pixel (c, p·f + i, q·f + j), shifted and scaled."""
    f, shift, scale = 4, -0.9, 2.5
    codec = PixelUnshuffleCodec(f, shift=shift, scale=scale)
    video = torch.randn(2, 3, 5, 8, 12)
    z = codec.encode(video)
    for b, c, t, p, q, i, j in [(0, 0, 0, 0, 0, 0, 0), (1, 2, 4, 1, 2, 3, 1), (0, 1, 3, 1, 0, 2, 3)]:
        expected = (video[b, c, t, p * f + i, q * f + j] - shift) * scale
        assert torch.isclose(z[b, c * f * f + i * f + j, t, p, q], expected)


def test_codec_satisfies_the_latent_codec_contract_and_reports_shapes() -> None:
    codec = PixelUnshuffleCodec(4)
    assert isinstance(codec, LatentCodec)
    assert codec.latent_shape(8, 24, 24) == (48, 8, 6, 6)
    with pytest.raises(ValueError, match="not divisible"):
        codec.latent_shape(8, 26, 24)


def test_codec_folder_loads_through_load_codec(tmp_path) -> None:
    PixelUnshuffleCodec(4, shift=-0.9, scale=2.5).save_pretrained(tmp_path / "vae")
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["_class_name"] == "PixelUnshuffleCodec"
    codec = load_codec(tmp_path / "vae")
    assert isinstance(codec, PixelUnshuffleCodec) and (codec.factor, codec.shift, codec.scale) == (4, -0.9, 2.5)


def test_codec_config_without_factor_is_named(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "PixelUnshuffleCodec"}))
    with pytest.raises(ValueError, match="'factor'"):
        load_codec(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CodecError, match="config.json"):
        load_codec(tmp_path)
