"""The toy world's oracle process reward: the task reward of the one-step prediction x̂0(x_k), with its gradient.

A latent PRM is trained to predict, from a noisy latent x_k at σ_k, how good the finished video will be. In the toy
world the latent transform is exact and every task reward is a differentiable function of the pixels, so
``r(decode(x̂0))`` with ``x̂0 = x_k − σ_k·v_θ(x_k, σ_k)`` is that prediction made with the policy's own denoiser
(DESIGN.md section 5). It is what RGG and process advantages can get from a very good PRM, so running Euphonium with
it separates the method from the quality of a learned PRM. Registered as ``rewards.prm.kind: oracle``; it lives
beside the rollout policy (``prm.placement: colocated``) because its gradient runs through that policy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from euphonium_ray.models.base import LatentCodec, Policy, TextConditioning
from euphonium_ray.sde import expand_per_sample

__all__ = ["OracleProcessReward"]


class OracleProcessReward:
    """``ProcessRewardModel`` whose score is the run's task reward of ``decode(x − σ·v(x, σ))``.

    ``reward`` must offer ``differentiable_score(videos, captions)`` (the toy rewards do); captions come with the
    conditioning (``TextConditioning.captions``). At σ = 0 the latent is its own prediction (no network call).
    """

    def __init__(self, policy: Policy, codec: LatentCodec, reward: Any) -> None:
        if not hasattr(reward, "differentiable_score"):
            raise TypeError(f"the oracle process reward needs a differentiable task reward, got {type(reward).__name__}")
        self.policy, self.codec, self.reward = policy, codec, reward

    @classmethod
    def from_run_config(cls, cfg: Any, device: torch.device | str = "cpu", *, policy: Policy | None = None,
                        codec: LatentCodec | None = None, **_: Any) -> "OracleProcessReward":
        """The ``registry.PRMS`` factory: the run's task reward (``rewards.orm.backend``) around ``policy``."""
        from euphonium_ray.registry import ORMS

        if policy is None:
            raise ValueError("rewards.prm.kind='oracle' needs the rollout policy (prm.placement='colocated')")
        codec = codec if codec is not None else getattr(policy, "codec", None)
        if codec is None:
            raise ValueError("rewards.prm.kind='oracle' needs the latent codec of the model folder")
        return cls(policy, codec, ORMS.build(cfg.rewards.orm.backend, cfg, device))

    def _captions(self, cond: TextConditioning, batch: int) -> list[str]:
        if cond.captions is None or len(cond.captions) != batch:
            raise ValueError("the oracle process reward scores captions: the conditioning carries none")
        return list(cond.captions)

    def _reward_of_prediction(self, x: Tensor, sigma: Tensor | float, cond: TextConditioning) -> Tensor:
        sig = torch.as_tensor(sigma, device=x.device).to(x.dtype)
        sig = sig.expand(x.shape[0]) if sig.ndim == 0 else sig.reshape(-1)
        if bool((sig == 0).all()):
            x0 = x
        else:
            v = self.policy.velocity(x, sig, cond)
            x0 = x - expand_per_sample(sig, x, x.dtype) * v.to(x.dtype)
        video = self.codec.decode(x0)
        return self.reward.differentiable_score(video, self._captions(cond, x.shape[0]))

    def score(self, latents: Tensor, sigma: Tensor | float, cond: TextConditioning) -> Tensor:
        with torch.no_grad():
            return self._reward_of_prediction(latents.to(torch.promote_types(latents.dtype, torch.float32)), sigma, cond)

    def score_and_grad(self, latents: Tensor, sigma: Tensor | float, cond: TextConditioning) -> tuple[Tensor, Tensor]:
        """Scores (B,) and ``∇_x r`` (B, C, T, h, w), the gradient running through the policy's denoiser."""
        with torch.enable_grad():
            x = latents.detach().to(torch.promote_types(latents.dtype, torch.float32)).requires_grad_(True)
            r = self._reward_of_prediction(x, sigma, cond)
            (grad,) = torch.autograd.grad(r.sum(), x)
        return r.detach(), grad.detach()
