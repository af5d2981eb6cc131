"""What each role loads, from the run config: the policy copy of a role, the PRM, the codec and the ORM.

Models come only through the contracts of ``models/base.py`` and the component registries (``registry.py``: policy
family, codec, PRM kind, ORM backend); a loader that cannot load its model raises the loader's error (which names
the missing path). The Ray actors, the in-process benchmark and the GPU benches all load through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from euphonium_ray.config import RunConfig
from euphonium_ray.models.base import LatentCodec, OutcomeRewardModel

__all__ = ["MicroBatchedPRM", "Role", "build_orm", "learner_weight_dtype", "load_codec_for", "load_policy", "load_prm",
           "rollout_weight_dtype"]

Role = Literal["rollout", "learner", "reference"]


def learner_weight_dtype(cfg: RunConfig, on_gpu: bool) -> str:
    """The learner's weight dtype: fp32 masters; with LoRA and ``model.lora_base_dtype: bf16`` on GPU, a bf16
    frozen base (the adapters stay fp32)."""
    lora_bf16 = cfg.model.trainable == "lora" and cfg.model.lora_base_dtype == "bf16" and on_gpu
    return "bf16" if lora_bf16 else "fp32"


def rollout_weight_dtype(cfg: RunConfig) -> torch.dtype:
    """The dtype of the rollout workers' weights (``load_policy``'s rule): ``model.dtype`` on GPU, fp32 on CPU. The
    learner casts what it publishes to it on its own device, so only those bytes travel."""
    on_gpu = cfg.cluster.rollout_gpus > 0
    return torch.bfloat16 if (on_gpu and cfg.model.dtype == "bf16") else torch.float32


def load_policy(cfg: RunConfig, role: Role, device: torch.device):
    """The policy for one role: rollout copies in ``model.dtype`` on GPU (fp32 on CPU), frozen; the learner's
    fp32 master weights (autocast ``model.dtype`` on GPU), trainable, or under LoRA optionally a bf16 base with
    fp32 adapters (``learner_weight_dtype``); a frozen fp32 reference for KL."""
    from euphonium_ray.models.hunyuan import set_tf32
    from euphonium_ray.registry import POLICIES

    set_tf32(cfg.model.tf32)
    on_gpu = device.type == "cuda"
    low = "bf16" if cfg.model.dtype == "bf16" else "fp32"
    if role == "rollout":
        dtype, trainable = (low if on_gpu else "fp32"), cfg.model.trainable
    elif role == "learner":
        dtype, trainable = learner_weight_dtype(cfg, on_gpu), cfg.model.trainable
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
        lora_dtype="fp32" if role == "learner" else None,
        embedded_guidance=cfg.model.embedded_guidance,
        gradient_checkpointing=cfg.model.gradient_checkpointing and role == "learner",
        autocast_dtype=low if (on_gpu and low != "fp32") else None,
        with_codec=False,
        timestep_arithmetic=cfg.sampler.timestep_arithmetic,
    )
    if role != "learner":
        policy.transformer.requires_grad_(False)
        policy.transformer.eval()
    configure_speed = getattr(policy, "configure_speed", None)  # the fast path, for families that have one
    if configure_speed is not None:
        configure_speed(unpadded_attention=cfg.model.unpadded_attention, compile=cfg.model.compile,
                        merge_lora=cfg.model.merge_lora and role == "rollout")
    return policy


class MicroBatchedPRM:
    """A PRM whose RGG gradient is taken ``micro_batch`` samples at a time (``rewards.prm.micro_batch``): one
    chunk's activations are held at once (a full-size PRM's backward over a whole group is tens of GiB); scores
    and gradients are the same, since samples do not interact in the network. Everything else is the PRM's."""

    def __init__(self, prm: Any, micro_batch: int) -> None:
        self.prm, self.micro_batch = prm, int(micro_batch)

    def __getattr__(self, name: str) -> Any:
        if name == "prm":  # not set yet (e.g. while copying): no recursion
            raise AttributeError(name)
        return getattr(self.prm, name)

    def score_and_grad(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        n, step = latents.shape[0], self.micro_batch
        sigma = sigma.expand(n) if sigma.ndim == 0 else sigma
        parts = [self.prm.score_and_grad(latents[i:i + step], sigma[i:i + step], cond.index(slice(i, i + step)))
                 for i in range(0, n, step)]
        return torch.cat([s for s, _ in parts]), torch.cat([g for _, g in parts])


def load_prm(cfg: RunConfig, device: torch.device, policy: Any = None, codec: LatentCodec | None = None):
    """The process reward model ``rewards.prm.kind`` names (an oracle needs the rollout ``policy`` it lives with),
    its gradient in chunks of ``rewards.prm.micro_batch`` samples when that is set."""
    from euphonium_ray.registry import PRMS

    prm = PRMS.build(cfg.rewards.prm.kind, cfg, device, policy=policy, codec=codec)
    return MicroBatchedPRM(prm, cfg.rewards.prm.micro_batch) if cfg.rewards.prm.micro_batch else prm


def load_codec_for(cfg: RunConfig, device: torch.device) -> LatentCodec:
    from euphonium_ray.models.codecs import load_codec

    return load_codec(Path(cfg.model.path) / "vae", device=device)


def build_orm(cfg: RunConfig, device: torch.device) -> OutcomeRewardModel:
    """The outcome reward ``rewards.orm.backend`` names (``registry.ORMS``)."""
    from euphonium_ray.registry import ORMS

    return ORMS.build(cfg.rewards.orm.backend, cfg, device)
