"""Look at the toy world: sample videos from a model folder and write them as a PNG grid and an animated GIF.

Rows are videos, columns are frames (enlarged, one-pixel grey rules between frames), each row labelled with its
caption and ORM score. ``write_samples`` takes an optional PRM: with one, it also writes the guided (RGG) samples
of the same prompts and seeds next to the unguided ones, so the two can be compared row by row.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from euphonium_ray.config import RunConfig
from euphonium_ray.models.base import ProcessRewardModel
from euphonium_ray.toy.data import ShapesWorld

SCALE = 4  # pixels per video pixel in the images
LABEL_WIDTH = 230


def to_uint8(videos: Tensor) -> np.ndarray:
    """(B, 3, F, H, W) in [-1, 1] → (B, F, H, W, 3) uint8 (clamped: the codec decode is not)."""
    x = ((videos.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


def video_grid(videos: Tensor, labels: list[str] | None = None, scale: int = SCALE) -> Image.Image:
    """One row per video, one column per frame; ``labels`` are written left of each row."""
    frames = to_uint8(videos)
    b, f, h, w, _ = frames.shape
    cell_w, cell_h = w * scale + 1, h * scale + 1
    left = LABEL_WIDTH if labels else 0
    canvas = Image.new("RGB", (left + f * cell_w + 1, b * cell_h + 1), (96, 96, 96))
    draw = ImageDraw.Draw(canvas)
    for i in range(b):
        for j in range(f):
            tile = Image.fromarray(frames[i, j]).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (left + j * cell_w + 1, i * cell_h + 1))
        if labels:
            draw.rectangle([0, i * cell_h + 1, left - 2, (i + 1) * cell_h - 1], fill=(255, 255, 255))
            draw.text((4, i * cell_h + cell_h // 2 - 6), labels[i], fill=(0, 0, 0))
    return canvas


def write_gif(videos: Tensor, path: str | Path, columns: int = 8, scale: int = SCALE, ms_per_frame: int = 180) -> Path:
    """All videos tiled in a grid, animated over their frames."""
    frames = to_uint8(videos)
    b, f, h, w, _ = frames.shape
    cols = min(columns, b)
    rows = (b + cols - 1) // cols
    images = []
    for j in range(f):
        canvas = Image.new("RGB", (cols * (w * scale + 2), rows * (h * scale + 2)), (96, 96, 96))
        for i in range(b):
            tile = Image.fromarray(frames[i, j]).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, ((i % cols) * (w * scale + 2) + 1, (i // cols) * (h * scale + 2) + 1))
        images.append(canvas)
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)
    return path


def load_policy(model_dir: str | Path, device: str | torch.device = "cpu"):
    """The toy model folder's frozen policy (``registry.POLICIES["toy"]``)."""
    from euphonium_ray.registry import POLICIES

    return POLICIES.get("toy").from_pretrained(model_dir, trainable="none", device=device)


def caption_judge(cfg: RunConfig, device: str | torch.device = "cpu"):
    """The toy world's caption-faithfulness judge (``registry.ORMS["toy"]``) that labels the sample grids."""
    from euphonium_ray.registry import ORMS

    return ORMS.build("toy", cfg, device)


def model_conditioning(model_dir: str | Path, captions: list[str], pooled_dim: int):
    from euphonium_ray.toy.pretrain import prompt_conditioning

    return prompt_conditioning(Path(model_dir) / "embeddings" / "videos2caption.json", captions, pooled_dim)


@torch.no_grad()
def _decode(policy, latents: Tensor) -> Tensor:
    return policy.codec.decode(latents)


def generate(
    policy,
    cond,
    cfg: RunConfig,
    seed: int,
    *,
    noise_type: str = "ode",
    prm: ProcessRewardModel | None = None,
) -> Tensor:
    """Decoded videos (B, 3, F, H, W) for the conditioning rows; same seed → same initial noise with or without a PRM."""
    from euphonium_ray.sampling import sample_latents

    toy, s = cfg.toy, cfg.sampler
    shape = policy.codec.latent_shape(toy.frames, toy.size, toy.size)
    gen = torch.Generator(device=policy.device).manual_seed(int(seed))
    latents = sample_latents(
        policy, cond.to(policy.device), latent_shape=shape, num_steps=s.num_steps, shift=s.shift,
        noise_type=noise_type, eta=s.eta, flow_a=s.flow_a, generator=gen, prm=prm,
        rgg=cfg.rgg if prm is not None else None,
    )
    return _decode(policy, latents)


def sample_captions(world: ShapesWorld, count: int) -> list[str]:
    """``count`` captions spread over the world's prompts: a stride coprime with their number, so consecutive picks
    differ in colour, shape and direction and every prompt comes up once before any repeats."""
    n = len(world.prompts)
    step = max(1, n // max(1, min(count, n)))
    while math.gcd(step, n) != 1:
        step += 1
    return [world.prompts[(i * step) % n] for i in range(count)]


@dataclass
class SampleReport:
    paths: dict[str, str]
    orm: dict[str, float]
    count: int


def write_samples(
    model_dir: str | Path,
    out_dir: str | Path,
    cfg: RunConfig,
    *,
    count: int = 12,
    seed: int = 0,
    noise_type: str = "ode",
    prm: ProcessRewardModel | None = None,
    device: str = "cpu",
) -> SampleReport:
    """PNG grid + GIF of base samples (and of guided samples when ``prm`` is given); ORM means in the report."""
    if prm is not None and noise_type == "ode" and cfg.rgg.scale_mode == "target_ratio":
        raise ValueError("guided samples on the ODE sampler need rgg.scale_mode fixed or kl: target_ratio guidance is "
                         "a fraction of the step's noise, which the ODE sampler does not draw (pass --noise-type dance "
                         "or --set rgg.scale_mode=fixed)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld(cfg.toy)
    orm = caption_judge(cfg)
    policy = load_policy(model_dir, device)
    captions = sample_captions(world, count)
    cond = model_conditioning(model_dir, captions, policy.pooled_dim)
    runs: dict[str, Any] = {"base": None}
    if prm is not None:
        runs["guided"] = prm
    paths: dict[str, str] = {}
    scores: dict[str, float] = {}
    for name, which_prm in runs.items():
        videos = generate(policy, cond, cfg, seed, noise_type=noise_type, prm=which_prm)
        r = orm.score(videos, captions)
        labels = [f"{c}  ORM {float(x):.2f}" for c, x in zip(captions, r)]
        png = out / f"{name}_samples.png"
        video_grid(videos, labels).save(png)
        gif = write_gif(videos, out / f"{name}_samples.gif")
        paths[f"{name}_png"], paths[f"{name}_gif"] = str(png), str(gif)
        scores[name] = round(float(r.mean()), 4)
    real = world.videos(captions, seed=seed)
    video_grid(real, [f"{c}  ORM {float(x):.2f}" for c, x in zip(captions, orm.score(real, captions))]).save(
        out / "real_samples.png"
    )
    paths["real_png"] = str(out / "real_samples.png")
    scores["real"] = round(float(orm.score(real, captions).mean()), 4)
    report = SampleReport(paths=paths, orm=scores, count=count)
    (out / "samples.json").write_text(json.dumps(report.__dict__, indent=2) + "\n")
    return report
