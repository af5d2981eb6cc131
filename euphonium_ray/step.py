"""One Euphonium step as library calls, the same for the Ray actors, the in-process benchmark and the GPU benches.

A step is: ``rollout`` (the guided SDE over a batch of groups, with the run's sampler, guidance and log-prob
settings) → the outcome reward of the decoded x̂0 (and the PRM of it, where the latent outcome term is on) →
``learning.compute_advantages`` → ``learning.grpo_update`` with the learner's ``transition_generator`` and the
optimizer of ``build_optimizer``. Callers keep only what is theirs (Ray glue, timing, logging); none re-implements
a piece of the algorithm.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from euphonium_ray.config import OptimConfig, RunConfig
from euphonium_ray.learning import wants_output_rewards
from euphonium_ray.models.base import Policy, TextConditioning
from euphonium_ray.sampling import SpsaScoreFn, make_generators, sample_seed, sample_trajectories
from euphonium_ray.trajectory import Trajectories

__all__ = ["build_optimizer", "rollout", "transition_generator", "uses_prm", "wants_latent_outcome"]


def rollout(policy: Policy, cond: TextConditioning, cfg: RunConfig, *, prm: Any, seeds: Sequence[int],
            latent_shape: Sequence[int], prompt_indices: Sequence[int] | None = None,
            captions: Sequence[str] | None = None, spsa_score_fn: SpsaScoreFn | None = None,
            weight_version: int = 0, timings: dict[str, float] | None = None) -> Trajectories:
    """Sample ``len(cond)`` rollouts (contiguous groups of ``sampler.group_size``) with the run's settings; row r
    draws its noise from ``seeds[r]`` (so a rollout does not depend on how rows are split over workers)."""
    device = cond.prompt_embeds.device
    return sample_trajectories(
        policy, cond, sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa, prm=prm if cfg.rgg.enabled else None,
        latent_shape=latent_shape, group_size=cfg.sampler.group_size,
        generator=make_generators(seeds), spsa_score_fn=spsa_score_fn,
        same_initial_noise=cfg.sampler.same_initial_noise, logprob_mean=cfg.optim.logprob_mean,
        reduction=cfg.optim.logprob_reduction, prompt_indices=prompt_indices, sample_seeds=list(seeds),
        captions=captions, weight_version=weight_version, timings=timings,
        output_rewards=wants_output_rewards(cfg),
    )


def transition_generator(run_seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The generator that picks the trained transitions of a step (a learner rank's own stream)."""
    return torch.Generator().manual_seed(sample_seed(run_seed, step, -1, rank))


def build_optimizer(params: Sequence[nn.Parameter] | list[Tensor], optim: OptimConfig) -> torch.optim.Optimizer:
    """The learner's AdamW, from ``optim`` (lr, betas, eps, weight decay): the one place it is built."""
    return torch.optim.AdamW(list(params), lr=optim.lr, betas=tuple(optim.betas), eps=optim.adam_eps,
                             weight_decay=optim.weight_decay)


def wants_latent_outcome(cfg: RunConfig) -> bool:
    """The PRM score of the final x̂0 enters the advantages (as a term or inside the outcome score)."""
    r = cfg.rewards
    return r.latent_outcome and (cfg.advantage.latent_outcome_weight != 0 or r.latent_outcome_coef_in_score != 0)


def uses_prm(cfg: RunConfig) -> bool:
    """Whether a run needs a PRM: for guidance/process rewards (RGG window) or the latent outcome term."""
    return cfg.rgg.enabled or wants_latent_outcome(cfg)
