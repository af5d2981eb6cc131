"""One Euphonium step as library calls, the same for the Ray actors, the in-process benchmark and the GPU benches.

A step is :func:`rollout` (the guided SDE over a batch of groups, with the run's sampler, guidance and log-prob
settings) → :func:`score` (the outcome reward of the decoded x̂0, and the PRM of it where the latent outcome term
is on) → :func:`advantages` → :func:`learning_batch` (the rows the learner trains on; :func:`split_for_learners`
shares them over data-parallel ranks) → :func:`learn` (``learning.grpo_update`` with each rank's
:func:`transition_generator` and the optimizer of :func:`build_optimizer`). Callers keep only what is theirs (Ray
glue, timing, logging); none re-implements a piece of the algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from euphonium_ray.config import OptimConfig, RunConfig
from euphonium_ray.learning import AdvantageTerms, Advantages, compute_advantages, grpo_update, wants_output_rewards
from euphonium_ray.models.base import Policy, TextConditioning
from euphonium_ray.sampling import GeneratorLike, SpsaScoreFn, make_generators, sample_seed, sample_trajectories
from euphonium_ray.trajectory import Trajectories, group_rows

__all__ = ["LearnBatch", "Rewards", "advantages", "build_optimizer", "learn", "learning_batch", "rollout", "score",
           "split_for_learners", "transition_generator", "uses_prm", "wants_latent_outcome"]

# latents (B, ...) and their captions -> the outcome reward of each decoded video (B,)
ScoreVideos = Callable[[Tensor, list[str]], Tensor]
# clean latents (B, ...) and their conditioning -> the PRM at σ = 0 (B,)
ScoreClean = Callable[[Tensor, TextConditioning], Tensor]


# ---------------------------------------------------------------------------------------------- rollout
def rollout(policy: Policy, cond: TextConditioning, cfg: RunConfig, *, prm: Any, latent_shape: Sequence[int],
            seeds: Sequence[int] | None = None, generator: GeneratorLike = None,
            prompt_indices: Sequence[int] | None = None, captions: Sequence[str] | None = None,
            spsa_score_fn: SpsaScoreFn | None = None, weight_version: int = 0, micro_batch: int | None = None,
            timings: dict[str, float] | None = None) -> Trajectories:
    """Sample ``len(cond)`` rollouts (contiguous groups of ``sampler.group_size``) with the run's settings; row r
    draws its noise from ``seeds[r]`` (so a rollout does not depend on how rows are split over workers), or from
    ``generator`` when no seeds are given."""
    return sample_trajectories(
        policy, cond, sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa, prm=prm if cfg.rgg.enabled else None,
        latent_shape=latent_shape, group_size=cfg.sampler.group_size,
        generator=make_generators(seeds) if seeds is not None else generator, spsa_score_fn=spsa_score_fn,
        same_initial_noise=cfg.sampler.same_initial_noise, logprob_mean=cfg.optim.logprob_mean,
        reduction=cfg.optim.logprob_reduction, micro_batch=micro_batch, prompt_indices=prompt_indices,
        sample_seeds=list(seeds) if seeds is not None else None, captions=captions, weight_version=weight_version,
        timings=timings, output_rewards=wants_output_rewards(cfg),
    )


# ---------------------------------------------------------------------------------------------- rewards
@dataclass
class Rewards:
    """A batch's outcome rewards: the pixel ORM per row, and the PRM of the final x̂0 where it is scored."""

    orm: Tensor
    latent: Tensor | None = None


def score(traj: Trajectories, score_videos: ScoreVideos, score_clean: ScoreClean | None = None) -> Rewards:
    """The outcome rewards of a batch's final x̂0: ``score_videos`` (decode + ORM, wherever it runs) and, when given,
    ``score_clean`` (the latent PRM at σ = 0). NaN marks a video the scorer could not judge."""
    orm = score_videos(traj.x0_hat_final, traj.captions)
    latent = score_clean(traj.x0_hat_final, traj.cond) if score_clean is not None else None
    return Rewards(orm, latent)


def advantages(traj: Trajectories, rewards: Rewards, cfg: RunConfig) -> Advantages:
    """Dual-reward advantages per group (``learning.compute_advantages``)."""
    return compute_advantages(traj, rewards.orm, rewards.latent, cfg)


# ---------------------------------------------------------------------------------------------- learning
@dataclass
class LearnBatch:
    """What one learner trains on: trajectory rows and their advantage terms; ``traj`` None when every group of
    the step was skipped (the weight version still advances). ``rows``: which rows of the step's whole rollout
    batch ``traj`` holds, in order (so that a learner can take them from the rollouts it is sent itself)."""

    traj: Trajectories | None
    terms: AdvantageTerms
    rows: Tensor | None = None

    @property
    def num_groups(self) -> int:
        return 0 if self.traj is None else self.traj.num_groups


def learning_batch(traj: Trajectories, adv: Advantages, members: int = 1) -> LearnBatch:
    """The rows the learner trains on: the kept groups; for an ensemble of ``members`` policies every row, with a
    skipped group's advantages at zero (the K equal blocks must stay equal)."""
    if adv.kept_rows.numel() == 0:
        return LearnBatch(None, [])
    if members == 1:
        return LearnBatch(traj.select(adv.kept_rows), adv.terms, adv.kept_rows.cpu())
    full = []
    for w, a in adv.terms:
        zeroed = torch.zeros(traj.batch_size, *a.shape[1:], dtype=a.dtype)
        zeroed[adv.kept_rows] = a.cpu()
        full.append((w, zeroed))
    return LearnBatch(traj, full, torch.arange(traj.batch_size))


def split_for_learners(batch: LearnBatch, ranks: int) -> tuple[list[LearnBatch], int]:
    """The batch's groups split evenly over ``ranks`` data-parallel learners (every rank must step the same number
    of times); returns the shards and how many groups were left out to make the split even."""
    if batch.traj is None:
        return [LearnBatch(None, []) for _ in range(ranks)], 0
    traj = batch.traj
    per = traj.num_groups // ranks
    shards = []
    for r in range(ranks):
        if per == 0:
            shards.append(LearnBatch(None, []))
            continue
        rows = group_rows(range(r * per, (r + 1) * per), traj.group_size)
        shards.append(LearnBatch(traj.select(rows), [(w, a[rows]) for w, a in batch.terms],
                                 batch.rows[rows] if batch.rows is not None else None))
    return shards, traj.num_groups - per * ranks


def transition_generator(run_seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The generator that picks the trained transitions of a step (a learner rank's own stream)."""
    return torch.Generator().manual_seed(sample_seed(run_seed, step, -1, rank))


def learn(policy: Policy, optimizer: torch.optim.Optimizer, batch: LearnBatch, cfg: RunConfig, *, step: int,
          run_seeds: Sequence[int], rank: int = 0, reference: Policy | None = None,
          grad_sync: Callable[[list[nn.Parameter]], None] | None = None) -> dict[str, Any]:
    """One GRPO pass over ``batch`` (``learning.grpo_update``): member m of an ensemble picks its transitions with
    ``transition_generator(run_seeds[m], step, rank)``. Returns the learner's statistics (empty: nothing to learn)."""
    if batch.traj is None:
        return {}
    gens = [transition_generator(s, step, rank) for s in run_seeds]
    return grpo_update(policy, optimizer, batch.traj, batch.terms, cfg, gens, reference, grad_sync=grad_sync)


def build_optimizer(params: Iterable[nn.Parameter] | Iterable[Tensor], optim: OptimConfig) -> torch.optim.Optimizer:
    """The learner's AdamW, from ``optim`` (lr, betas, eps, weight decay): the one place it is built."""
    return torch.optim.AdamW(list(params), lr=optim.lr, betas=(optim.betas[0], optim.betas[1]), eps=optim.adam_eps,
                             weight_decay=optim.weight_decay)


# -------------------------------------------------------------------------------------------- what runs
def wants_latent_outcome(cfg: RunConfig) -> bool:
    """The PRM score of the final x̂0 enters the advantages (as a term or inside the outcome score)."""
    r = cfg.rewards
    return r.latent_outcome and (cfg.advantage.latent_outcome_weight != 0 or r.latent_outcome_coef_in_score != 0)


def uses_prm(cfg: RunConfig) -> bool:
    """Whether a run needs a PRM: for guidance/process rewards (RGG window) or the latent outcome term."""
    return cfg.rgg.enabled or wants_latent_outcome(cfg)
