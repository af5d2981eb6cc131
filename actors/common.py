"""What every actor does when it starts: pick its device and thread count, load its model from the run config.

Models come only through the contracts of ``models/base.py`` and the component registries (``registry.py``: policy
family, codec, PRM kind, ORM backend); an actor that cannot load its model fails at construction with the loader's
error (which names the missing path).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch

from euphonium_ray.config import RunConfig
from euphonium_ray.models.base import LatentCodec, OutcomeRewardModel

__all__ = ["actor_device", "build_orm", "config_from", "load_codec_for", "load_policy", "load_prm", "set_threads"]

Role = Literal["rollout", "learner", "reference"]


def set_threads(num_cpus: float) -> None:
    """Keep torch's intra-op pool to the CPUs Ray gave this actor (oversubscribing 2 cores halves throughput)."""
    n = max(1, int(num_cpus))
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def actor_device(gpus: float) -> torch.device:
    """cuda when Ray gave this actor a GPU share and torch sees one, else cpu."""
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def load_policy(cfg: RunConfig, role: Role, device: torch.device):
    """The policy for one role: rollout copies in ``model.dtype`` on GPU (fp32 on CPU), frozen; the learner's
    fp32 master weights (autocast ``model.dtype`` on GPU), trainable; a frozen fp32 reference for KL."""
    from euphonium_ray.models.hunyuan import set_tf32
    from euphonium_ray.registry import POLICIES

    set_tf32(cfg.model.tf32)
    on_gpu = device.type == "cuda"
    low = "bf16" if cfg.model.dtype == "bf16" else "fp32"
    if role == "rollout":
        dtype, trainable = (low if on_gpu else "fp32"), cfg.model.trainable
    elif role == "learner":
        dtype, trainable = "fp32", cfg.model.trainable
    else:
        dtype, trainable = "fp32", "none"
    policy = POLICIES.get(cfg.model.family).from_pretrained(
        cfg.model.path,
        dtype=dtype,
        device=device,
        checkpoint=cfg.model.checkpoint,
        trainable=trainable,
        lora_rank=cfg.model.lora_rank,
        lora_alpha=cfg.model.lora_alpha,
        lora_seed=cfg.seed,
        embedded_guidance=cfg.model.embedded_guidance,
        gradient_checkpointing=cfg.model.gradient_checkpointing and role == "learner",
        autocast_dtype=low if (on_gpu and low != "fp32") else None,
        with_codec=False,
        timestep_arithmetic=cfg.sampler.timestep_arithmetic,
    )
    if role != "learner":
        policy.transformer.requires_grad_(False)
        policy.transformer.eval()
    return policy


def load_prm(cfg: RunConfig, device: torch.device, policy: Any = None, codec: LatentCodec | None = None):
    """The process reward model ``rewards.prm.kind`` names (an oracle needs the rollout ``policy`` it lives with)."""
    from euphonium_ray.registry import PRMS

    return PRMS.build(cfg.rewards.prm.kind, cfg, device, policy=policy, codec=codec)


def load_codec_for(cfg: RunConfig, device: torch.device) -> LatentCodec:
    from euphonium_ray.models.codecs import load_codec

    return load_codec(Path(cfg.model.path) / "vae", device=device)


def build_orm(cfg: RunConfig, device: torch.device) -> OutcomeRewardModel:
    """The outcome reward ``rewards.orm.backend`` names (``registry.ORMS``)."""
    from euphonium_ray.registry import ORMS

    return ORMS.build(cfg.rewards.orm.backend, cfg, device)


def config_from(payload: dict[str, Any] | RunConfig) -> RunConfig:
    """The run config an actor was given; the run's plugins are imported first, so their components resolve."""
    if isinstance(payload, RunConfig):
        return payload
    from euphonium_ray.registry import load_plugins

    load_plugins(payload.get("plugins") or [])
    return RunConfig.model_validate(payload)
