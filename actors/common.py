"""What every actor does when it starts: pick its device and thread count, load its model from the run config.

Models come only through the contracts of ``models/base.py`` and the loaders of the models package; an actor
that cannot load its model fails at construction with the loader's error (which names the missing path).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from euphonium_ray.config import RunConfig
from euphonium_ray.models.base import LatentCodec, OutcomeRewardModel

__all__ = ["actor_device", "build_orm", "load_codec_for", "load_policy", "load_prm", "register_orm_backend",
           "set_threads"]

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
    from euphonium_ray.models.hunyuan import HunyuanVideoPolicy

    on_gpu = device.type == "cuda"
    low = "bf16" if cfg.model.dtype == "bf16" else "fp32"
    if role == "rollout":
        dtype, trainable = (low if on_gpu else "fp32"), cfg.model.trainable
    elif role == "learner":
        dtype, trainable = "fp32", cfg.model.trainable
    else:
        dtype, trainable = "fp32", "none"
    policy = HunyuanVideoPolicy.from_pretrained(
        cfg.model.path,
        dtype=dtype,
        device=device,
        checkpoint=cfg.model.checkpoint,
        trainable=trainable,
        lora_rank=cfg.model.lora_rank,
        lora_alpha=cfg.model.lora_alpha,
        embedded_guidance=cfg.model.embedded_guidance,
        gradient_checkpointing=cfg.model.gradient_checkpointing and role == "learner",
        autocast_dtype=low if (on_gpu and low != "fp32") else None,
        with_codec=False,
    )
    if role != "learner":
        policy.transformer.requires_grad_(False)
        policy.transformer.eval()
    return policy


def load_prm(cfg: RunConfig, device: torch.device):
    from euphonium_ray.models.prm import LatentPRM

    dtype = torch.bfloat16 if (cfg.rewards.prm.dtype == "bf16" and device.type == "cuda") else torch.float32
    return LatentPRM.from_pretrained(cfg.rewards.prm.path, device=device, dtype=dtype,
                                     use_sigmoid=cfg.rewards.prm.use_sigmoid)


def load_codec_for(cfg: RunConfig, device: torch.device) -> LatentCodec:
    from euphonium_ray.models.codecs import load_codec

    return load_codec(Path(cfg.model.path) / "vae", device=device)


# -------------------------------------------------------------------------------------------- ORM backends
OrmFactory = Callable[[RunConfig, torch.device], OutcomeRewardModel]


def _toy_orm(cfg: RunConfig, device: torch.device) -> OutcomeRewardModel:
    from euphonium_ray.toy.orm import ToyPixelORM

    return ToyPixelORM.from_config(cfg.toy)


_ORM_BACKENDS: dict[str, OrmFactory] = {"toy": _toy_orm}


def register_orm_backend(name: str, factory: OrmFactory) -> None:
    """Add a pixel ORM backend (``rewards.orm.backend``): a factory (config, device) -> OutcomeRewardModel."""
    _ORM_BACKENDS[name] = factory


def build_orm(cfg: RunConfig, device: torch.device) -> OutcomeRewardModel:
    name = cfg.rewards.orm.backend
    if name not in _ORM_BACKENDS:
        raise NotImplementedError(
            f"rewards.orm.backend={name!r} has no scorer in this build (available: {', '.join(sorted(_ORM_BACKENDS))})"
        )
    return _ORM_BACKENDS[name](cfg, device)


def config_from(payload: dict[str, Any] | RunConfig) -> RunConfig:
    return payload if isinstance(payload, RunConfig) else RunConfig.model_validate(payload)
