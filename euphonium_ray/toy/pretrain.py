"""Flow-matching pretraining of the toy policy: the base model that RL then improves.

Objective (DESIGN.md conventions): a clean latent x0 = codec.encode(video), noise ε, σ drawn per sample,
``x_σ = (1−σ)·x0 + σ·ε``, target ``v = ε − x0``, loss ``mean‖v_θ(x_σ, σ, text) − v‖²``. The forward goes through
``HunyuanVideoPolicy.velocity``, so the timestep (``int(1000σ)``) and the embedded-guidance constant are exactly
those of sampling. σ is either a logit-normal draw pushed through the sampler's time shift
(``σ = s·u/(1+(s−1)·u)``, u = sigmoid(N(0,1))), or uniform over the sampler's own 16 σ values.

Runs on CUDA when available (the committed model was trained there), else on the CPU; the world's videos are
rendered on the same device, so data costs nothing.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from euphonium_ray.config import RunConfig, ToyConfig
from euphonium_ray.data import DataError, PromptEmbeddingDataset
from euphonium_ray.models.base import LatentCodec, TextConditioning
from euphonium_ray.sde import sigma_schedule
from euphonium_ray.toy.data import ShapesWorld

PRETRAIN_INFO = "pretrain_info.json"


def prompt_conditioning(index_json: str | Path, captions: list[str], pooled_dim: int) -> TextConditioning:
    """The stored embeddings of ``captions`` (rows in that order); a caption with no embedding is named."""
    dataset = PromptEmbeddingDataset(index_json, pooled_dim=pooled_dim)
    where = {c: i for i, c in enumerate(dataset.captions)}
    missing = [c for c in captions if c not in where]
    if missing:
        raise DataError(f"{index_json}: no prompt embedding for {', '.join(repr(c) for c in missing[:5])}")
    cond, _ = dataset.conditioning([where[c] for c in captions])
    return cond.to(dtype=torch.float32)


def toy_transformer_kwargs(toy: ToyConfig, latent_channels: int) -> dict[str, Any]:
    """``HunyuanVideoTransformer3DModel`` arguments of the toy policy (patch size 1: one token per latent pixel)."""
    from euphonium_ray.models.tiny import tiny_transformer_config

    t_dim = max(2, (toy.head_dim // 4) // 2 * 2)
    hw_dim = (toy.head_dim - t_dim) // 2 // 2 * 2
    rope = (toy.head_dim - 2 * hw_dim, hw_dim, hw_dim)
    kwargs = tiny_transformer_config(
        in_channels=latent_channels,
        text_dim=toy.text_dim,
        pooled_dim=toy.pooled_dim,
        num_attention_heads=toy.heads,
        attention_head_dim=toy.head_dim,
        num_layers=toy.dual_layers,
        num_single_layers=toy.single_layers,
        num_refiner_layers=toy.refiner_layers,
        rope_axes_dim=rope,
    )
    kwargs["mlp_ratio"] = float(toy.mlp_ratio)
    return kwargs


def new_transformer(toy: ToyConfig, latent_channels: int, seed: int):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(**toy_transformer_kwargs(toy, latent_channels))


def sample_sigma(batch: int, mode: str, shift: float, num_steps: int, generator: torch.Generator, device) -> Tensor:
    """Training noise levels σ (B,) in (0, 1]."""
    if mode == "schedule":
        sched = sigma_schedule(num_steps, shift)[:-1]
        return sched[torch.randint(num_steps, (batch,), generator=generator)].to(device)
    u = torch.sigmoid(torch.randn(batch, generator=generator))
    return (shift * u / (1 + (shift - 1) * u)).clamp(1e-4, 1.0).to(device)


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class PretrainReport:
    device: str
    steps: int
    batch: int
    seconds: float
    final_loss: float
    parameters: int
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def flow_matching_loss(policy, x0: Tensor, sigma: Tensor, cond: TextConditioning, noise: Tensor) -> Tensor:
    s = sigma.view(-1, 1, 1, 1, 1)
    x_sigma = (1 - s) * x0 + s * noise
    v = policy.velocity(x_sigma, sigma, cond)
    return torch.mean((v - (noise - x0)) ** 2)


def pretrain(
    cfg: RunConfig,
    embeddings: str | Path,
    codec: LatentCodec,
    *,
    device: str | torch.device | None = None,
    steps: int | None = None,
    batch: int | None = None,
    save_every: int = 0,
    save_fn: Callable[[Any, int], str] | None = None,
    log: Callable[[str], None] = print,
    log_every: int = 100,
):
    """Train a fresh toy transformer; returns (transformer, PretrainReport). ``save_fn(transformer, step)`` is
    called every ``save_every`` steps (intermediate checkpoints let one pick a deliberately imperfect base)."""
    from euphonium_ray.models.hunyuan import HunyuanVideoPolicy

    toy = cfg.toy
    steps = int(steps or toy.pretrain_steps)
    batch = int(batch or toy.pretrain_batch)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    world = ShapesWorld(toy)
    cond_all = prompt_conditioning(embeddings, world.prompts, toy.pooled_dim).to(device)
    latent_channels = codec.latent_shape(toy.frames, toy.size, toy.size)[0]
    transformer = new_transformer(toy, latent_channels, toy.pretrain_seed).to(device).train()
    policy = HunyuanVideoPolicy(transformer, codec, embedded_guidance=cfg.model.embedded_guidance)
    params = [p for p in transformer.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=toy.pretrain_lr, weight_decay=0.01, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(toy.pretrain_seed + 1)
    noise_gen = torch.Generator(device=device).manual_seed(toy.pretrain_seed + 2)
    log(f"toy pretrain: {n_params:,} parameters, {steps} steps of batch {batch} on {device}")
    report = PretrainReport(device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                            steps=steps, batch=batch, seconds=0.0, final_loss=float("nan"), parameters=n_params)
    start, running = time.time(), None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, toy.pretrain_lr, toy.pretrain_warmup, steps)
        videos, idx = world.batch(batch, gen, device)
        x0 = codec.encode(videos)
        sigma = sample_sigma(batch, toy.pretrain_sigma, cfg.sampler.shift, cfg.sampler.num_steps, gen, device)
        noise = torch.randn(x0.shape, generator=noise_gen, device=device)
        loss = flow_matching_loss(policy, x0, sigma, cond_all.index(idx.to(device)), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        value = float(loss.detach()) if (step + 1) % 10 == 0 or step == 0 else None
        if value is not None:
            running = value if running is None else 0.9 * running + 0.1 * value
        if (step + 1) % log_every == 0 or step + 1 == steps:
            report.loss_curve.append((step + 1, round(float(running), 5)))
            log(f"step {step + 1}/{steps} loss {running:.4f} ({time.time() - start:.0f}s)")
        if save_fn is not None and save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            report.checkpoints.append(save_fn(transformer, step + 1))
    report.seconds = round(time.time() - start, 1)
    report.final_loss = round(float(running), 5)
    transformer.eval()
    return transformer, report
