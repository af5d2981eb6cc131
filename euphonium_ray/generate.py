"""``euphonium-ray generate``: sample videos from a model folder (ODE, SDE, or reward-gradient-guided SDE).

Like upstream's visualisation script, each (prompt i, video k) gets its own seed ``seed + 1000·i + k`` (one
generator per video, so a video does not depend on what else shares its batch), the last step's x̂0 is decoded with
the model's codec, and every video is written as MP4 (GIF when no ffmpeg is available) next to a PNG contact sheet
and a ``samples.json`` index. Defaults come from a run config (``--config``) and the flags override them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from euphonium_ray.config import ConfigError, RGGConfig, RunConfig, SamplerConfig, SPSAConfig, load_config
from euphonium_ray.data import DataError, PromptEmbeddingDataset
from euphonium_ray.models.base import Policy, ProcessRewardModel, TextConditioning
from euphonium_ray.sampling import make_generators, sample_trajectories

SamplerKind = Literal["ode", "sde", "rgg"]
THUMB_HEIGHT = 128
SHEET_COLUMNS = 8


def video_seed(seed: int, prompt_index: int, video_index: int) -> int:
    """Upstream's per-video seed: ``seed + prompt_index·1000 + video_index``."""
    return int(seed) + int(prompt_index) * 1000 + int(video_index)


def sample_video_latents(
    policy: Policy,
    cond: TextConditioning,
    *,
    latent_shape: tuple[int, ...],
    num_steps: int,
    shift: float,
    noise_type: Literal["dance", "flow", "ode"] = "ode",
    eta: float = 0.25,
    flow_a: float = 0.7,
    generator: torch.Generator | list[torch.Generator] | None = None,
    prm: ProcessRewardModel | None = None,
    rgg: RGGConfig | None = None,
) -> Tensor:
    """The x̂0 of the last step for each row of ``cond`` (what upstream decodes), via ``sampling.py``'s sampler.

    For the ODE this equals the final latent; for the SDE it leaves out the last step's noise, as upstream does.
    RGG is on when both ``prm`` and ``rgg`` (with ``enabled``) are given.
    """
    sampler = SamplerConfig(num_steps=num_steps, shift=shift, noise_type=noise_type, eta=eta, flow_a=flow_a,
                            group_size=1, same_initial_noise=False)
    use_rgg = prm is not None and rgg is not None and rgg.enabled
    traj = sample_trajectories(
        policy, cond, sampler=sampler, rgg=rgg if use_rgg else RGGConfig(enabled=False),
        spsa=SPSAConfig(enabled=False), prm=prm if use_rgg else None, latent_shape=latent_shape, group_size=1,
        generator=generator, same_initial_noise=False,
    )
    return traj.x0_hat_final


def sample_videos(policy: Policy, cond: TextConditioning, **kwargs: Any) -> Tensor:
    """Sampled videos (B, 3, F, H, W) in [-1, 1]: ``sample_video_latents`` decoded with the policy's codec."""
    latents = sample_video_latents(policy, cond, **kwargs)
    return policy.codec.decode(latents).float().clamp(-1, 1)


# ------------------------------------------------------------------------------------------- writing
def to_uint8_frames(video: Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] → (F, H, W, 3) uint8."""
    frames = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).numpy()


def _even(frames: np.ndarray) -> np.ndarray:
    """H.264 in yuv420p needs even sides; repeat the last row/column when a side is odd."""
    _, h, w, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def ffmpeg_available() -> bool:
    try:
        import imageio_ffmpeg

        return Path(imageio_ffmpeg.get_ffmpeg_exe()).exists()
    except Exception:  # not installed, or no binary for this platform
        return False


def write_video(path_stem: Path, frames: np.ndarray, fps: float) -> Path:
    """MP4 (H.264) when ffmpeg is available, else an animated GIF; returns the written path."""
    import imageio.v2 as iio

    if ffmpeg_available():
        path = path_stem.with_suffix(".mp4")
        writer = iio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1, ffmpeg_log_level="error",
                                output_params=["-pix_fmt", "yuv420p"])
        try:
            for frame in _even(frames):
                writer.append_data(frame)
        finally:
            writer.close()
        return path
    path = path_stem.with_suffix(".gif")
    iio.mimsave(path, list(frames), duration=1.0 / fps, loop=0)
    return path


def contact_sheet(rows: list[np.ndarray], path: Path, columns: int = SHEET_COLUMNS) -> Path:
    """One row per video, ``columns`` evenly spaced frames each, thumbnails at most 128 px high."""
    from PIL import Image

    thumbs: list[list[Image.Image]] = []
    for frames in rows:
        idx = np.linspace(0, len(frames) - 1, num=min(columns, len(frames))).round().astype(int)
        row = []
        for i in idx:
            img = Image.fromarray(frames[i])
            if img.height > THUMB_HEIGHT:
                img = img.resize((max(1, img.width * THUMB_HEIGHT // img.height), THUMB_HEIGHT), Image.BILINEAR)
            row.append(img)
        thumbs.append(row)
    cell_w = max(im.width for row in thumbs for im in row)
    cell_h = max(im.height for row in thumbs for im in row)
    sheet = Image.new("RGB", (cell_w * columns, cell_h * len(thumbs)), (255, 255, 255))
    for r, row in enumerate(thumbs):
        for c, im in enumerate(row):
            sheet.paste(im, (c * cell_w, r * cell_h))
    sheet.save(path)
    return path


def slug(caption: str, limit: int = 50) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", caption[:limit]).strip("_") or "prompt"


# --------------------------------------------------------------------------------------------- driver
@dataclass
class GenerateSettings:
    sampler: SamplerKind
    num_videos: int
    seed: int
    num_steps: int
    shift: float
    eta: float
    flow_a: float
    noise_type: Literal["dance", "flow"]
    frames: int
    height: int
    width: int
    fps: float
    rgg: RGGConfig


def load_prompt_dataset(prompts: str | Path, model_dir: str | Path, out: Path, pooled_dim: int,
                        max_tokens: int, device: str) -> PromptEmbeddingDataset:
    """A ``videos2caption.json`` as it is, or a prompts ``.txt`` encoded first (into ``out/embeddings``)."""
    path = Path(prompts)
    if path.suffix.lower() == ".json":
        return PromptEmbeddingDataset(path, pooled_dim=pooled_dim)
    from euphonium_ray.preprocess import preprocess_prompts

    index = preprocess_prompts(model_dir, path, out / "embeddings", max_tokens=max_tokens, device=device,
                               dtype="fp32", progress=False)
    return PromptEmbeddingDataset(index, pooled_dim=pooled_dim)


def generate(policy: Policy, dataset: PromptEmbeddingDataset, out: Path, settings: GenerateSettings,
             prm: ProcessRewardModel | None = None, max_prompts: int | None = None, progress: bool = True) -> Path:
    """Sample ``num_videos`` per prompt, write videos, a contact sheet and ``samples.json``; returns its path."""
    from tqdm.auto import tqdm

    if settings.sampler == "rgg" and prm is None:
        raise ValueError("--sampler rgg needs a process reward model (--prm DIR)")
    if settings.sampler == "rgg" and settings.rgg.start >= settings.num_steps:
        raise ValueError(f"rgg.start={settings.rgg.start} is past the last of {settings.num_steps} sampling steps, so "
                         "no step would be guided; lower it (e.g. --set rgg.start=...) or raise --steps")
    out.mkdir(parents=True, exist_ok=True)
    latent_shape = policy.codec.latent_shape(settings.frames, settings.height, settings.width)
    noise_type = "ode" if settings.sampler == "ode" else settings.noise_type
    device = next(policy.transformer.parameters()).device
    count = len(dataset) if max_prompts is None else min(max_prompts, len(dataset))
    records, sheet_rows = [], []
    for i in tqdm(range(count), desc="generate", unit="prompt", disable=not progress):
        cond, captions = dataset.conditioning([i])
        cond = cond.repeat_interleave(settings.num_videos).to(device=device, dtype=torch.float32)
        seeds = [video_seed(settings.seed, i, k) for k in range(settings.num_videos)]
        videos = sample_videos(
            policy, cond, latent_shape=latent_shape, num_steps=settings.num_steps, shift=settings.shift,
            noise_type=noise_type, eta=settings.eta, flow_a=settings.flow_a,
            generator=make_generators(seeds), prm=prm if settings.sampler == "rgg" else None,
            rgg=settings.rgg if settings.sampler == "rgg" else None,
        )
        for k, seed in enumerate(seeds):
            frames = to_uint8_frames(videos[k])
            path = write_video(out / f"{i:04d}_{slug(captions[0])}_seed{seed}", frames, settings.fps)
            sheet_rows.append(frames)
            records.append({"prompt_index": i, "video_index": k, "seed": seed, "caption": captions[0],
                            "path": str(path), "frames": int(frames.shape[0])})
    contact_sheet(sheet_rows, out / "contact_sheet.png")
    index = out / "samples.json"
    meta = {"sampler": settings.sampler, "noise_type": noise_type, "num_steps": settings.num_steps,
            "shift": settings.shift, "eta": settings.eta, "latent_shape": list(latent_shape), "samples": records}
    index.write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return index


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="euphonium-ray generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="run config YAML; its model/data/sampler/rgg sections give the defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--model", help="model folder (transformer/, vae/, text encoders); default: model.path")
    p.add_argument("--checkpoint", help="trained transformer: a step-N checkpoint or diffusers transformer folder")
    p.add_argument("--prompts", help="videos2caption.json, or a prompts .txt to encode first")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sampler", choices=("ode", "sde", "rgg"), default="ode")
    p.add_argument("--prm", help="latent PRM folder (config.json + model.safetensors), for --sampler rgg")
    p.add_argument("--num-videos", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--steps", type=int, help="sampling steps (default: sampler.num_steps)")
    p.add_argument("--shift", type=float, help="schedule shift (default: sampler.shift)")
    p.add_argument("--eta", type=float, help="SDE noise level (default: sampler.eta)")
    p.add_argument("--frames", type=int, help="video frames (default: data.num_frames)")
    p.add_argument("--height", type=int, help="default: data.height")
    p.add_argument("--width", type=int, help="default: data.width")
    p.add_argument("--rgg-scale", type=float, help="guidance scale c (default: rgg.scale / KL mode from the config)")
    p.add_argument("--rgg-start", type=int, help="first guided step (default: rgg.start)")
    p.add_argument("--rgg-end", type=int, help="guided steps stop before this one (default: rgg.end, the last)")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--max-prompts", type=int, help="only the first N prompts")
    p.add_argument("--max-tokens", type=int, default=None, help="LLM rows when encoding a .txt (default 256)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="policy weights (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.set, use_env=False) if (args.config or args.set) else RunConfig()
        return _run(args, cfg)
    except (ConfigError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _rgg_settings(rgg: RGGConfig, args: argparse.Namespace) -> RGGConfig:
    """The config's RGG window with the command-line overrides applied (a fixed scale when one is given)."""
    update: dict[str, Any] = {"enabled": True}
    if args.rgg_scale is not None:
        update.update(scale=args.rgg_scale, scale_mode="fixed")
    if args.rgg_start is not None:
        update["start"] = args.rgg_start
    if args.rgg_end is not None:
        update["end"] = args.rgg_end
    return RGGConfig.model_validate({**rgg.model_dump(), **update})


def _run(args: argparse.Namespace, cfg: RunConfig) -> int:
    from euphonium_ray.registry import POLICIES

    model_dir = args.model or cfg.model.path
    if not model_dir:
        raise ValueError("no model folder: pass --model DIR (or set model.path in --config)")
    prompts = args.prompts or cfg.data.eval_prompts or cfg.data.prompts
    if not prompts:
        raise ValueError("no prompts: pass --prompts (a videos2caption.json or a .txt)")
    if args.sampler == "rgg" and not (args.prm or cfg.rewards.prm.path):
        raise ValueError("--sampler rgg needs --prm DIR (a latent PRM folder)")
    if args.num_videos < 1:
        raise ValueError(f"--num-videos must be >= 1, got {args.num_videos}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    policy = POLICIES.get(cfg.model.family).from_pretrained(
        model_dir, dtype=dtype, device=device, checkpoint=args.checkpoint or cfg.model.checkpoint,
        trainable="none", embedded_guidance=cfg.model.embedded_guidance,
    )
    prm = None
    if args.sampler == "rgg":
        from euphonium_ray.prm_training import load_prm_folder

        prm = load_prm_folder(args.prm or cfg.rewards.prm.path, cfg, device)
    max_tokens = args.max_tokens or (cfg.toy.text_max_tokens if cfg.model.family == "toy" else 256)
    out = Path(args.out)
    dataset = load_prompt_dataset(prompts, model_dir, out, policy.pooled_dim, max_tokens, device)
    settings = GenerateSettings(
        sampler=args.sampler, num_videos=args.num_videos, seed=args.seed,
        num_steps=args.steps or cfg.sampler.num_steps, shift=args.shift or cfg.sampler.shift,
        eta=cfg.sampler.eta if args.eta is None else args.eta, flow_a=cfg.sampler.flow_a,
        noise_type="dance" if cfg.sampler.noise_type == "ode" else cfg.sampler.noise_type,
        frames=args.frames or cfg.data.num_frames, height=args.height or cfg.data.height,
        width=args.width or cfg.data.width, fps=args.fps, rgg=_rgg_settings(cfg.rgg, args),
    )
    index = generate(policy, dataset, out, settings, prm=prm, max_prompts=args.max_prompts,
                     progress=not args.no_progress)
    print(f"wrote {index}")
    return 0
