"""The learner's side of Dual-Reward GRPO: advantages from rewards, and one clipped-GRPO update pass.

Pure library code (no Ray): ``actors/learner.py`` runs it inside Ray Train, the in-process benchmark runs it
directly. The maths is ``grpo.py``/``sde.py``; this module only gathers the right tensors, batches a
sample's selected transitions through the network in one forward, accumulates gradients over
``optim.grad_accum`` samples and steps the optimizer, the way upstream's trainer does (DESIGN.md section 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from euphonium_ray.config import RunConfig
from euphonium_ray.grpo import (
    AdvantageWeights,
    advantage_terms,
    distillation_loss,
    dual_reward_policy_loss,
    group_normalize,
    kl_to_reference,
    process_advantages,
    select_timesteps,
)
from euphonium_ray.models.base import Policy
from euphonium_ray.sde import flow_sigma_1, step_std, transition_log_prob, unguided_mean
from euphonium_ray.sharding import to_float
from euphonium_ray.trajectory import Trajectories

__all__ = ["Advantages", "compute_advantages", "grpo_update", "trainable_transitions"]

AdvantageTerms = list[tuple[float, Tensor]]


# ------------------------------------------------------------------------------------------- advantages
@dataclass
class Advantages:
    """Advantage terms for the rows that survived (``kept_rows`` of the batch), and why groups were dropped.

    ``terms`` are (weight, A (B_kept, N)) as ``grpo.advantage_terms`` returns them; select the same rows of
    the trajectories (``traj.select(kept_rows)``) before learning.
    """

    terms: AdvantageTerms
    kept_rows: Tensor
    skipped_groups: dict[int, str] = field(default_factory=dict)
    outcome_scores: Tensor | None = None  # the combined outcome score r_o per kept row


def _bad_groups(values: Tensor | None, mask: Tensor | None, group_size: int, name: str) -> dict[int, str]:
    if values is None:
        return {}
    bad = ~torch.isfinite(values)
    if mask is not None:
        bad = bad & mask
    per_row = bad.reshape(bad.shape[0], -1).any(dim=1)
    out: dict[int, str] = {}
    for row in per_row.nonzero().flatten().tolist():
        out.setdefault(row // group_size, f"non-finite {name} reward at sample {row}")
    return out


def compute_advantages(
    traj: Trajectories,
    orm_rewards: Tensor | None,
    latent_outcome_rewards: Tensor | None,
    cfg: RunConfig,
) -> Advantages:
    """Dual-reward advantages per group, skipping groups with a non-finite ORM, latent or process reward.

    Outcome score ``r_o = orm.coef·r_ORM + latent_outcome_coef_in_score·r_latent`` (upstream's "score");
    process rewards are the PRM scores recorded during sampling; the latent outcome term (PRM of the final x̂0)
    enters when ``rewards.latent_outcome`` is on. Combination, weights and clamp follow ``cfg.advantage``.
    """
    b, g = traj.batch_size, traj.group_size
    skipped: dict[int, str] = {}
    for name, values, mask in (
        ("ORM", orm_rewards, None),
        ("latent outcome", latent_outcome_rewards, None),
        ("process", traj.process_rewards, traj.process_evaluated),
    ):
        for group, reason in _bad_groups(values, mask, g, name).items():
            skipped.setdefault(group, reason)
    keep_groups = [k for k in range(traj.num_groups) if k not in skipped]
    kept_rows = (torch.tensor(keep_groups, dtype=torch.long).unsqueeze(1) * g + torch.arange(g)).reshape(-1)
    n = traj.num_steps
    if kept_rows.numel() == 0:
        return Advantages([], kept_rows, skipped, None)

    def rows(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.reshape(b, *t.shape[1:])[kept_rows.to(t.device)].float().cpu()

    orm, latent = rows(orm_rewards), rows(latent_outcome_rewards)
    score = torch.zeros(kept_rows.numel())
    if orm is not None:
        score = score + cfg.rewards.orm.coef * orm
    if latent is not None and cfg.rewards.latent_outcome_coef_in_score != 0:
        score = score + cfg.rewards.latent_outcome_coef_in_score * latent
    a_outcome = group_normalize(score, g)
    evaluated = traj.process_evaluated[kept_rows.to(traj.process_evaluated.device)].cpu()
    a_process = None
    if bool(evaluated.any()):
        a_process = process_advantages(rows(traj.process_rewards), evaluated, g)
    a_latent = group_normalize(latent, g) if (latent is not None and cfg.rewards.latent_outcome) else None
    weights = AdvantageWeights(cfg.advantage.outcome_weight, cfg.advantage.process_weight,
                               cfg.advantage.latent_outcome_weight)
    terms = advantage_terms(a_outcome, a_process, a_latent, mode=cfg.advantage.mode, combine=cfg.advantage.combine,
                            weights=weights, clamp=cfg.advantage.clamp, num_transitions=n)
    return Advantages(terms, kept_rows, skipped, score)


# ---------------------------------------------------------------------------------------------- update
def trainable_transitions(num_steps: int, cfg: RunConfig) -> int:
    """How many leading transitions may be trained: N−1 as upstream (σ_{N−1} → 0 never is), or N."""
    return num_steps if cfg.optim.train_last_transition or num_steps == 1 else num_steps - 1


@dataclass
class _Totals:
    """Running sums of the per-sample statistics of one update pass."""

    count: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    ratio_min: float = math.inf
    ratio_max: float = -math.inf
    first_min: float = math.inf
    first_max: float = -math.inf

    def add(self, **values: float) -> None:
        self.count += 1
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def mean(self, key: str) -> float:
        return self.sums.get(key, 0.0) / max(self.count, 1)


def grpo_update(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    traj: Trajectories,
    advantages_terms: AdvantageTerms,
    cfg: RunConfig,
    generator: torch.Generator | None = None,
    reference_policy: Policy | None = None,
    *,
    grad_sync: Callable[[list[nn.Parameter]], None] | None = None,
) -> dict[str, float]:
    """One pass (``optim.epochs`` passes) of clipped GRPO over the batch; returns scalar statistics.

    Per sample: a random subset of its trainable transitions (``select_timesteps``), one forward of all of
    them with gradients, ``logp_new`` under the training mean convention, the dual-reward clipped loss, plus
    optional KL to ``reference_policy`` and distillation toward the stored guided mean (guided transitions
    only); the loss is scaled by 1/GA (it is already a mean over the n_t transitions, i.e. 1/(GA·n_t) per
    transition) and backpropagated at once. Every GA samples (or at the end): ``grad_sync`` (e.g. a
    data-parallel all-reduce), grad-norm clip, optimizer step. ``first_ratio_*`` are the ratio extremes over
    the samples of the first optimizer update (1 exactly when the rollouts are on-policy).
    """
    o, sp = cfg.optim, cfg.sampler
    b, n = traj.batch_size, traj.num_steps
    for w, a in advantages_terms:
        if tuple(a.shape) != (b, n):
            raise ValueError(f"advantage term of weight {w} has shape {tuple(a.shape)}, expected {(b, n)}")
    if b == 0:
        raise ValueError("grpo_update got an empty trajectory batch (every group was skipped?)")
    params = [p for p in policy.trainable_parameters() if p.requires_grad]
    device = params[0].device if params else traj.latents.device
    traj = traj.to(device)
    terms = [(w, a.to(device)) for w, a in advantages_terms]
    sigmas = traj.sigmas
    sigma_1 = flow_sigma_1(sigmas)
    guided_pos = torch.full((n,), -1, dtype=torch.long, device=device)
    guided_pos[traj.guided_steps] = torch.arange(traj.guided_steps.numel(), device=device)
    want_kl = o.kl_coef > 0 and reference_policy is not None
    if o.kl_coef > 0 and reference_policy is None:
        raise ValueError("optim.kl_coef > 0 needs a frozen reference policy")

    totals = _Totals()
    grad_norms: list[float] = []
    updates = 0
    optimizer.zero_grad(set_to_none=True)
    for _epoch in range(o.epochs):
        chosen = select_timesteps(b, trainable_transitions(n, cfg), fraction=o.timestep_fraction,
                                  mode=o.timestep_selection, start=o.range_start, end=o.range_end,
                                  interval=o.range_interval, generator=generator).to(device)
        for chunk_start in range(0, b, o.grad_accum):
            chunk = range(chunk_start, min(chunk_start + o.grad_accum, b))
            for j in chunk:
                k = chosen[j]
                s, s_next = sigmas[k], sigmas[k + 1]
                x, x_next = traj.states[j, k], traj.next_states[j, k]
                cond = traj.cond.index([j] * k.numel())
                v = policy.velocity(x, s, cond)
                mean = unguided_mean(x, v, s, s_next, sp.noise_type, eta=sp.eta, flow_a=sp.flow_a, sigma_1=sigma_1)
                std = step_std(s, s_next, sp.noise_type, eta=sp.eta, flow_a=sp.flow_a, sigma_1=sigma_1)
                pos = guided_pos[k]
                is_guided = pos >= 0
                ref_mean = mean
                if o.logprob_mean_training == "guided" and bool(is_guided.any()):
                    shift = torch.zeros_like(mean)
                    shift[is_guided] = traj.guidance_shifts[j, pos[is_guided]]
                    ref_mean = mean + shift
                logp_new = transition_log_prob(x_next, ref_mean, std, reduction=o.logprob_reduction)
                logp_old = traj.log_probs[j, k]
                loss, stats = dual_reward_policy_loss(logp_new, logp_old, [(w, a[j, k]) for w, a in terms],
                                                      o.clip_range)
                policy_loss = loss.detach()
                kl = torch.zeros((), device=device)
                if want_kl:
                    with torch.no_grad():
                        v_ref = reference_policy.velocity(x, s, cond)  # type: ignore[union-attr]
                    mean_ref = unguided_mean(x, v_ref, s, s_next, sp.noise_type, eta=sp.eta, flow_a=sp.flow_a,
                                             sigma_1=sigma_1)
                    kl = kl_to_reference(mean, mean_ref, std, reduction=o.logprob_reduction).mean()
                    loss = loss + o.kl_coef * kl
                distill = torch.zeros((), device=device)
                if o.distill_coef > 0 and bool(is_guided.any()):
                    target = traj.guided_means[j, pos[is_guided]]
                    share = float(is_guided.sum()) / k.numel()  # a mean over all n_t transitions of the sample
                    distill = distillation_loss(mean[is_guided], target, std[is_guided],
                                                reduction=o.logprob_reduction) * share
                    loss = loss + o.distill_coef * distill
                (loss / len(chunk)).backward()
                totals.add(loss=float(loss.detach()), policy_loss=float(policy_loss), kl=float(kl.detach()),
                           distill_loss=float(distill.detach()), clip_fraction=stats.get("clip_fraction/term0", 0.0),
                           ratio_mean=stats.get("ratio_mean", 1.0), approx_kl=stats.get("approx_kl", 0.0))
                if terms:
                    totals.ratio_min = min(totals.ratio_min, stats["ratio_min"])
                    totals.ratio_max = max(totals.ratio_max, stats["ratio_max"])
                    if updates == 0:
                        totals.first_min = min(totals.first_min, stats["ratio_min"])
                        totals.first_max = max(totals.first_max, stats["ratio_max"])
            if grad_sync is not None:
                grad_sync(params)
            grad_norms.append(to_float(torch.nn.utils.clip_grad_norm_(params, o.grad_clip)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
    out = {key: totals.mean(key) for key in ("loss", "policy_loss", "kl", "distill_loss", "clip_fraction",
                                               "ratio_mean", "approx_kl")}
    out.update(
        ratio_min=totals.ratio_min if terms else 1.0,
        ratio_max=totals.ratio_max if terms else 1.0,
        first_ratio_min=totals.first_min if terms else 1.0,
        first_ratio_max=totals.first_max if terms else 1.0,
        grad_norm=sum(grad_norms) / max(len(grad_norms), 1),
        num_transitions=float(b * int(chosen.shape[1]) * o.epochs),
        num_updates=float(updates),
    )
    return out
