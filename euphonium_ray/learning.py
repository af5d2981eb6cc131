"""The learner's side of Dual-Reward GRPO: advantages from rewards, and one clipped-GRPO update pass.

Pure library code (no Ray): ``actors/learner.py`` runs it inside Ray Train, the in-process benchmark runs it
directly. The maths is ``grpo.py``/``sde.py``; this module only gathers the right tensors, batches a
sample's selected transitions through the network in one forward, accumulates gradients over
``optim.grad_accum`` samples and steps the optimizer, the way upstream's trainer does (DESIGN.md section 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from euphonium_ray.config import RunConfig
from euphonium_ray.grpo import (
    AdvantageWeights,
    advantage_terms,
    distillation_loss_per_sample,
    dual_reward_policy_loss,
    group_normalize,
    kl_to_reference,
    process_advantages,
    select_timesteps,
    upstream_velocity_kl,
)
from euphonium_ray.models.base import Policy
from euphonium_ray.sde import SDE, transition_log_prob
from euphonium_ray.sharding import to_float
from euphonium_ray.trajectory import Trajectories, group_rows

__all__ = ["AdvantageTerms", "Advantages", "compute_advantages", "grpo_update", "process_credit", "trainable_transitions",
           "unused_by_learner", "wants_output_rewards"]

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
    if not cfg.rewards.orm.enabled:  # upstream TRL_CORE_ENABLED=false: the pixel ORM takes no part
        orm_rewards = None
    skipped: dict[int, str] = {}
    for name, values, mask in (
        ("ORM", orm_rewards, None),
        ("latent outcome", latent_outcome_rewards, None),
        ("process", traj.process_rewards, traj.process_evaluated),
    ):
        for group, reason in _bad_groups(values, mask, g, name).items():
            skipped.setdefault(group, reason)
    credit_rewards, credit_mask = process_credit(traj, cfg.advantage.process_credit)
    for group, reason in _bad_groups(credit_rewards, credit_mask, g, "process").items():
        skipped.setdefault(group, reason)
    keep_groups = [k for k in range(traj.num_groups) if k not in skipped]
    kept_rows = group_rows(keep_groups, g)
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
    evaluated = credit_mask[kept_rows.to(credit_mask.device)].cpu()
    a_process = None
    if bool(evaluated.any()):
        a_process = process_advantages(rows(credit_rewards), evaluated, g)
    a_latent = group_normalize(latent, g) if (latent is not None and cfg.rewards.latent_outcome) else None
    a_pixel = group_normalize(orm, g) if (orm is not None and cfg.advantage.pixel_outcome_weight != 0) else None
    weights = AdvantageWeights(cfg.advantage.outcome_weight, cfg.advantage.process_weight,
                               cfg.advantage.latent_outcome_weight, cfg.advantage.pixel_outcome_weight)
    terms = advantage_terms(a_outcome, a_process, a_latent, mode=cfg.advantage.mode, combine=cfg.advantage.combine,
                            weights=weights, clamp=cfg.advantage.clamp, num_transitions=n, a_pixel_outcome=a_pixel)
    return Advantages(terms, kept_rows, skipped, score)


def process_credit(traj: Trajectories, credit: str) -> tuple[Tensor, Tensor]:
    """The process reward that credits each transition k, and where it exists (both (B, N)).

    ``input``: r(x_k) (upstream): fixed before transition k's noise is drawn, so on-policy
    ``E[A_k·∇log π(x_{k+1}|x_k)] = 0``; ``output``: r(x_{k+1}); ``difference``: r(x_{k+1}) − r(x_k), what the
    transition changed. The last two need ``process_rewards_next`` (``sample_trajectories(output_rewards=True)``).
    """
    if credit == "input":
        return traj.process_rewards, traj.process_evaluated
    if traj.process_rewards_next is None or traj.process_evaluated_next is None:
        if not bool(traj.process_evaluated.any()):
            return traj.process_rewards, traj.process_evaluated  # nothing was scored: no process term either way
        raise ValueError(f"advantage.process_credit={credit!r} needs the process reward of each transition's "
                         "output; the rollouts did not record it (sample_trajectories(output_rewards=True))")
    if credit == "output":
        return traj.process_rewards_next, traj.process_evaluated_next
    if credit == "difference":
        mask = traj.process_evaluated & traj.process_evaluated_next
        diff = torch.where(mask, traj.process_rewards_next - traj.process_rewards, torch.zeros_like(traj.process_rewards))
        return diff, mask
    raise ValueError(f"advantage.process_credit must be input, output or difference, got {credit!r}")


def unused_by_learner(cfg: RunConfig) -> tuple[str, ...]:
    """Rollout tensors this run's learner never reads: the guided means (only distillation does) and the guidance
    shifts (only a log-prob under the guided mean does). Leaving them out of the transfer halves or thirds it."""
    names = []
    if cfg.optim.distill_coef == 0:
        names.append("guided_means")
    if cfg.optim.logprob_mean_training != "guided":
        names.append("guidance_shifts")
    return tuple(names)


def wants_output_rewards(cfg: RunConfig) -> bool:
    """Whether rollouts must record the process reward of each transition's output (output/difference credit)."""
    return cfg.rgg.enabled and cfg.advantage.process_credit != "input" and cfg.advantage.mode != "none"


# ---------------------------------------------------------------------------------------------- update
def trainable_transitions(num_steps: int, cfg: RunConfig) -> int:
    """How many leading transitions may be trained: N−1 as upstream (σ_{N−1} → 0 never is), or N."""
    return num_steps if cfg.optim.train_last_transition or num_steps == 1 else num_steps - 1


class _Totals:
    """Running sums of the per-sample statistics of one update pass (for one ensemble member)."""

    def __init__(self) -> None:
        self.count = 0
        self.sums: dict[str, float] = {}
        self.ratio_min, self.ratio_max = math.inf, -math.inf
        self.first_min, self.first_max = math.inf, -math.inf
        self.grad_norms: list[float] = []

    def add(self, samples: int, **values: float) -> None:
        """``values`` are means over ``samples`` samples."""
        self.count += samples
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * samples

    def ratios(self, low: float, high: float, first_update: bool) -> None:
        self.ratio_min, self.ratio_max = min(self.ratio_min, low), max(self.ratio_max, high)
        if first_update:
            self.first_min, self.first_max = min(self.first_min, low), max(self.first_max, high)

    def mean(self, key: str) -> float:
        return self.sums.get(key, 0.0) / max(self.count, 1)

    def summary(self, have_terms: bool, transitions: int, updates: int) -> dict[str, float]:
        out = {key: self.mean(key) for key in ("loss", "policy_loss", "kl", "distill_loss", "clip_fraction",
                                                 "ratio_mean", "approx_kl")}
        out.update(
            ratio_min=self.ratio_min if have_terms else 1.0,
            ratio_max=self.ratio_max if have_terms else 1.0,
            first_ratio_min=self.first_min if have_terms else 1.0,
            first_ratio_max=self.first_max if have_terms else 1.0,
            grad_norm=sum(self.grad_norms) / max(len(self.grad_norms), 1),
            num_transitions=float(transitions),
            num_updates=float(updates),
        )
        return out


def clip_grad_norm_per_member(params: list[nn.Parameter], max_norm: float, members: int) -> list[float]:
    """``clip_grad_norm_`` for each member of an ensemble whose parameters are stacked on dim 0: every member's
    gradient is clipped by its own total norm, exactly as if it were trained alone. Returns the norms."""
    if members == 1:
        return [to_float(torch.nn.utils.clip_grad_norm_(params, max_norm))]
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return [0.0] * members
    sq = torch.stack([g.reshape(members, -1).float().pow(2).sum(1) for g in grads]).sum(0)
    norms = sq.sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype).reshape(members, *([1] * (g.ndim - 1))))
    return [float(n) for n in norms]


def grpo_update(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    traj: Trajectories,
    advantages_terms: AdvantageTerms,
    cfg: RunConfig,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    reference_policy: Policy | None = None,
    *,
    grad_sync: Callable[[list[nn.Parameter]], None] | None = None,
) -> dict[str, Any]:
    """One pass (``optim.epochs`` passes) of clipped GRPO over the batch; returns scalar statistics.

    Per sample: a random subset of its trainable transitions (``select_timesteps``); ``logp_new`` under the
    training mean convention, the dual-reward clipped loss, plus optional KL to ``reference_policy`` and
    distillation toward the stored guided mean (guided transitions of guided members only). Every sample's loss
    is a mean over its transitions, and a chunk of ``optim.grad_accum`` samples is one optimizer update whose loss
    is the mean over its samples; ``optim.samples_per_forward`` samples go through the network in one forward
    (the gradients add up to the same). Each chunk ends with ``grad_sync`` (e.g. a data-parallel all-reduce),
    grad-norm clip and an optimizer step. ``first_ratio_*`` are the ratio extremes over the samples of the first
    optimizer update (1 exactly when the rollouts are on-policy).

    An ensemble policy (``policy.members`` = K > 1, see ``ensemble.py``) trains K independent runs at once: the
    batch is K equal blocks of rows, one per member; ``generator`` is one generator per member; each member's
    loss, clipping and statistics are its own, and the result carries them under ``members``.
    """
    o = cfg.optim
    b, n = traj.batch_size, traj.num_steps
    k_members = int(getattr(policy, "members", 1))
    for w, a in advantages_terms:
        if tuple(a.shape) != (b, n):
            raise ValueError(f"advantage term of weight {w} has shape {tuple(a.shape)}, expected {(b, n)}")
    if b == 0:
        raise ValueError("grpo_update got an empty trajectory batch (every group was skipped?)")
    if b % k_members:
        raise ValueError(f"a batch of {b} rows cannot be split over {k_members} ensemble members")
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * k_members
    if len(gens) != k_members:
        raise ValueError(f"{len(gens)} generators for {k_members} ensemble members")
    if o.kl_coef > 0 and reference_policy is None:
        raise ValueError("optim.kl_coef > 0 needs a frozen reference policy")
    params = [p for p in policy.trainable_parameters() if p.requires_grad]
    device = params[0].device if params else traj.latents.device
    traj = traj.to(device)
    terms = [(w, a.to(device)) for w, a in advantages_terms]
    per_member = b // k_members
    totals = [_Totals() for _ in range(k_members)]
    updates = 0
    transitions = 0
    optimizer.zero_grad(set_to_none=True)
    for _epoch in range(o.epochs):
        chosen = torch.cat([
            select_timesteps(per_member, trainable_transitions(n, cfg), fraction=o.timestep_fraction,
                             mode=o.timestep_selection, start=o.range_start, end=o.range_end,
                             interval=o.range_interval, generator=gens[m])
            for m in range(k_members)
        ]).to(device)
        transitions += b * int(chosen.shape[1])
        for chunk_start in range(0, per_member, o.grad_accum):
            chunk_len = min(o.grad_accum, per_member - chunk_start)
            step = o.samples_per_forward or chunk_len
            for sub_start in range(chunk_start, chunk_start + chunk_len, step):
                sub = range(sub_start, min(sub_start + step, chunk_start + chunk_len))
                rows = torch.tensor([m * per_member + j for m in range(k_members) for j in sub], device=device)
                loss, member_stats = _transition_losses(policy, traj, terms, cfg, rows, chosen[rows],
                                                        reference_policy, k_members, chunk_len)
                loss.backward()
                for m, st in enumerate(member_stats):
                    totals[m].add(len(sub), **st["means"])
                    if terms:
                        totals[m].ratios(st["ratio_min"], st["ratio_max"], updates == 0)
            if grad_sync is not None:
                grad_sync(params)
            for m, norm in enumerate(clip_grad_norm_per_member(params, o.grad_clip, k_members)):
                totals[m].grad_norms.append(norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
    summaries = [t.summary(bool(terms), transitions // k_members, updates) for t in totals]
    if k_members == 1:
        return summaries[0]
    out: dict[str, Any] = {key: sum(s[key] for s in summaries) / k_members for key in summaries[0]}
    out["members"] = summaries
    return out


def _transition_losses(
    policy: Policy, traj: Trajectories, terms: AdvantageTerms, cfg: RunConfig, rows: Tensor, chosen: Tensor,
    reference_policy: Policy | None, k_members: int, chunk_len: int,
) -> tuple[Tensor, list[dict[str, Any]]]:
    """The loss of ``rows`` (member-major, equal count per member) at their ``chosen`` transitions, scaled so that
    a chunk of ``chunk_len`` samples per member sums to each member's mean sample loss, and per-member stats."""
    o, sp = cfg.optim, cfg.sampler
    n = traj.num_steps
    r, t = chosen.shape
    flat_rows = rows.repeat_interleave(t)
    flat_k = chosen.reshape(-1)
    sigmas = traj.sigmas
    sde = SDE.on_schedule(sp.noise_type, sp.eta, sp.flow_a, sigmas)
    s, s_next = sigmas[flat_k], sigmas[flat_k + 1]
    x = traj.latents[flat_rows, flat_k]
    x_next = traj.latents[flat_rows, flat_k + 1]
    cond = traj.cond.index(flat_rows)
    v = policy.velocity(x, s, cond)
    mean = sde.mean(x, v, s, s_next)
    std = sde.std(s, s_next)
    guided_pos = torch.full((n,), -1, dtype=torch.long, device=x.device)
    guided_pos[traj.guided_steps] = torch.arange(traj.guided_steps.numel(), device=x.device)
    pos = guided_pos[flat_k]
    on_guided_step = pos >= 0
    ref_mean = mean
    if o.logprob_mean_training == "guided" and bool(on_guided_step.any()):
        shift = torch.zeros_like(mean)
        shift[on_guided_step] = traj.guidance_shifts[flat_rows[on_guided_step], pos[on_guided_step]]
        ref_mean = mean + shift
    logp_new = transition_log_prob(x_next, ref_mean, std, reduction=o.logprob_reduction).reshape(r, t)
    logp_old = traj.log_probs[rows.unsqueeze(1), chosen]
    kl = torch.zeros(r, t, device=x.device)
    if o.kl_coef > 0 and reference_policy is not None:
        with torch.no_grad():
            v_ref = reference_policy.velocity(x, s, cond)
        if o.kl_form == "upstream":
            kl = upstream_velocity_kl(v, v_ref, s, s - s_next, sde.diffusion(s),
                                      reduction=o.logprob_reduction).reshape(r, t)
        else:
            mean_ref = sde.mean(x, v_ref, s, s_next)
            kl = kl_to_reference(mean, mean_ref, std, reduction=o.logprob_reduction).reshape(r, t)
    distill = torch.zeros(r, t, device=x.device)
    distill_on = on_guided_step
    if traj.guided_rows is not None:
        distill_on = distill_on & traj.guided_rows[flat_rows]
    if o.distill_coef > 0 and bool(distill_on.any()):
        target = traj.guided_means[flat_rows[distill_on], pos[distill_on]]
        d = torch.zeros(r * t, device=x.device)
        d[distill_on] = distillation_loss_per_sample(mean[distill_on], target, std[distill_on], o.logprob_reduction)
        distill = d.reshape(r, t)
    per_member = r // k_members
    total = torch.zeros((), device=x.device)
    stats: list[dict[str, Any]] = []
    for m in range(k_members):
        sl = slice(m * per_member, (m + 1) * per_member)
        member_rows = rows[sl]
        policy_loss, st = dual_reward_policy_loss(logp_new[sl], logp_old[sl],
                                                  [(w, a[member_rows.unsqueeze(1), chosen[sl]]) for w, a in terms],
                                                  o.clip_range)
        kl_m, distill_m = kl[sl].mean(), distill[sl].mean()
        loss_m = policy_loss + o.kl_coef * kl_m + o.distill_coef * distill_m
        total = total + loss_m * (per_member / chunk_len)
        stats.append({
            "means": {"loss": float(loss_m.detach()), "policy_loss": float(policy_loss.detach()),
                      "kl": float(kl_m.detach()), "distill_loss": float(distill_m.detach()),
                      "clip_fraction": st.get("clip_fraction/term0", 0.0), "ratio_mean": st.get("ratio_mean", 1.0),
                      "approx_kl": st.get("approx_kl", 0.0)},
            "ratio_min": st.get("ratio_min", 1.0), "ratio_max": st.get("ratio_max", 1.0),
        })
    return total, stats
