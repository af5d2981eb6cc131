"""Dual-Reward GRPO maths: group-normalised advantages, the clipped policy loss, KL and distillation terms.

Pure functions on tensors. Rollouts of one prompt form a group of G contiguous rows (dim 0); advantages are
normalised within each group. Maths is fp32 (fp64 inputs stay fp64) and results are fp32.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from euphonium_ray.sde import ScalarLike, compute_dtype, expand_per_sample

__all__ = [
    "AdvantageMode",
    "AdvantageWeights",
    "CombineRule",
    "advantage_terms",
    "clipped_policy_loss",
    "distillation_loss",
    "distillation_loss_per_sample",
    "dual_reward_policy_loss",
    "gather_steps",
    "gaussian_kl",
    "group_normalize",
    "kl_to_reference",
    "parse_advantage_mode",
    "process_advantages",
    "select_timesteps",
    "upstream_velocity_kl",
]

AdvantageMode = Literal["both", "none", "only"]
CombineRule = Literal["paper", "upstream"]
Reduction = Literal["mean", "sum"]
_MODE_ALIASES: dict[str, AdvantageMode] = {"0": "none", "1": "only", "2": "both"}


# -------------------------------------------------------------------------------------------- advantages
def _check_finite(r: Tensor, mask: Tensor) -> None:
    bad = (~torch.isfinite(r)) & mask
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        where = index[0] if len(index) == 1 else index
        raise ValueError(f"reward at index {where} is non-finite ({float(r[index])}); skip or repair this group")


def _normalize_groups(r: Tensor, mask: Tensor, group_size: int, eps: float) -> Tensor:
    """(r − mean)/(unbiased std + eps) over the masked members of each group, per column; 0 elsewhere.

    A group (column) whose masked members are all equal, or that has fewer than two, gets exactly 0.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if r.ndim not in (1, 2):
        raise ValueError(f"rewards must have shape (B,) or (B, K), got {tuple(r.shape)}")
    if r.shape[0] % group_size != 0:
        raise ValueError(f"batch size {r.shape[0]} is not a multiple of group_size {group_size}")
    _check_finite(r, mask)
    dtype = compute_dtype(r)
    rg = torch.where(mask, r.to(dtype), torch.zeros((), dtype=dtype, device=r.device))
    rg = rg.reshape(-1, group_size, *r.shape[1:])
    mg = mask.reshape(rg.shape)
    count = mg.sum(dim=1, keepdim=True)
    mean = rg.sum(dim=1, keepdim=True) / count.clamp(min=1)
    centred = torch.where(mg, rg - mean, torch.zeros((), dtype=dtype, device=r.device))
    var = (centred**2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
    inf = torch.tensor(float("inf"), dtype=dtype, device=r.device)
    spread = torch.where(mg, rg, -inf).amax(dim=1, keepdim=True) > torch.where(mg, rg, inf).amin(dim=1, keepdim=True)
    valid = mg & (count >= 2) & spread
    out = torch.where(valid, centred / (var.sqrt() + eps), torch.zeros((), dtype=dtype, device=r.device))
    return out.reshape(r.shape)


def group_normalize(r: Tensor, group_size: int, eps: float = 1e-8) -> Tensor:
    """GRPO advantage ``(r − mean_G)/(std_G + eps)`` with the unbiased std, per group of ``group_size`` rows.

    ``r`` is (B,) or (B, K) (then each column is normalised separately). A group of identical rewards gives
    exactly 0, never NaN. Raises ValueError if B is not a multiple of the group size or if a reward is
    non-finite (the message names the index, so the caller can drop that group).
    """
    return _normalize_groups(r, torch.ones_like(r, dtype=torch.bool), group_size, eps)


def process_advantages(r_prm: Tensor, evaluated: Tensor, group_size: int, eps: float = 1e-8) -> Tensor:
    """Process advantages ``A_p[j, k]``: PRM scores of step k normalised within each group, 0 where the PRM
    was not evaluated. ``evaluated`` is bool (B, K) or (K,).

    Only evaluated members enter a group's mean and std (upstream includes its 0 placeholders, which biases
    a step where the PRM failed for some members); values at unevaluated positions are ignored, NaN included.
    """
    if r_prm.ndim != 2:
        raise ValueError(f"r_prm must have shape (B, K), got {tuple(r_prm.shape)}")
    mask = evaluated.to(device=r_prm.device, dtype=torch.bool)
    if mask.ndim == 1:
        mask = mask.unsqueeze(0)
    mask = mask.expand(r_prm.shape)
    return _normalize_groups(r_prm, mask, group_size, eps)


def parse_advantage_mode(value: str) -> AdvantageMode:
    """Accept ``both|none|only`` or upstream's numeric aliases ``'0'|'1'|'2'`` (none|only|both)."""
    key = str(value).strip().lower()
    key = _MODE_ALIASES.get(key, key)
    if key not in ("both", "none", "only"):
        raise ValueError(f"advantage mode must be both|none|only or 0|1|2, got {value!r}")
    return key  # type: ignore[return-value]


@dataclass(frozen=True)
class AdvantageWeights:
    """Weights of the advantage components. Upstream's effective values are outcome=2, process=1,
    latent_outcome=1 (a defaulting quirk, see the upstream digest section 4.4). ``pixel_outcome`` weighs a
    separate term on the pixel ORM's own advantage (upstream's ``trl`` reward, distinct from the combined
    ``score`` once the latent outcome is mixed into the score); 0 leaves it out."""

    outcome: float = 1.0
    process: float = 1.0
    latent_outcome: float = 0.0
    pixel_outcome: float = 0.0


def advantage_terms(
    a_outcome: Tensor,
    a_process: Tensor | None,
    a_latent_outcome: Tensor | None,
    *,
    mode: AdvantageMode = "both",
    combine: CombineRule = "paper",
    weights: AdvantageWeights = AdvantageWeights(),
    clamp: float = 5.0,
    num_transitions: int | None = None,
    a_pixel_outcome: Tensor | None = None,
) -> list[tuple[float, Tensor]]:
    """The (weight, advantage per transition (B, K)) terms of the policy loss.

    ``paper``: one term of weight 1, ``A = w_p·A_p + w_o·A_o (+ w_lo·A_lo)`` clamped to ±clamp after combining
    (one clipped objective, as in the paper's Figure 1). ``upstream``: one term per component, each clamped,
    each with its weight (upstream sums separately clipped losses). Mode ``none`` keeps outcome (+latent
    outcome), ``only`` keeps process (falling back to outcome with a warning when there is none), ``both``
    keeps all. Zero-weight components are left out. Per-sample components are broadcast over K, taken from
    ``a_process``, else ``num_transitions``, else 1. ``a_pixel_outcome`` (weight ``weights.pixel_outcome``)
    is an outcome component like ``a_outcome``, placed after it (upstream's order: score, trl, latent).
    """
    mode = parse_advantage_mode(mode)
    if combine not in ("paper", "upstream"):
        raise ValueError(f"combine must be 'paper' or 'upstream', got {combine!r}")
    dtype = compute_dtype(a_outcome, a_process, a_latent_outcome, a_pixel_outcome)
    batch = a_outcome.shape[0]
    k = a_process.shape[1] if a_process is not None else (num_transitions or 1)

    def per_transition(a: Tensor) -> Tensor:
        a = a.to(dtype)
        return a.reshape(batch, 1).expand(batch, k) if a.ndim == 1 else a.expand(batch, k)

    if mode == "only" and a_process is None:
        warnings.warn("advantage mode 'only' without process advantages: falling back to outcome", stacklevel=2)
        mode = "none"
    parts: list[tuple[float, Tensor]] = []
    if mode in ("none", "both"):
        parts.append((weights.outcome, per_transition(a_outcome)))
        if a_pixel_outcome is not None:
            parts.append((weights.pixel_outcome, per_transition(a_pixel_outcome)))
        if a_latent_outcome is not None:
            parts.append((weights.latent_outcome, per_transition(a_latent_outcome)))
    if mode in ("only", "both") and a_process is not None:
        parts.append((weights.process, per_transition(a_process)))
    parts = [(float(w), a) for w, a in parts if w != 0.0]
    if combine == "upstream":
        return [(w, a.clamp(-clamp, clamp)) for w, a in parts]
    if not parts:
        return []
    combined = sum((w * a for w, a in parts), torch.zeros(batch, k, dtype=dtype, device=a_outcome.device))
    return [(1.0, combined.clamp(-clamp, clamp))]


# ------------------------------------------------------------------------------------ timestep selection
def select_timesteps(
    batch: int,
    num_transitions: int,
    *,
    fraction: float = 0.6,
    mode: Literal["fraction", "range"] = "fraction",
    start: int = 0,
    end: int = -1,
    interval: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Which transitions each sample trains on: LongTensor (B, n) of step indices, shuffled per sample.

    ``fraction``: a random permutation per sample, first ``max(1, int(K·fraction))``. ``range``:
    ``arange(start, end+1 (or K if end < 0), interval)`` shuffled per sample. Gather every per-step tensor
    (latents, next latents, σ, old log-probs, advantages) with these same indices (:func:`gather_steps`);
    upstream's range mode permuted σ but not the latents.
    """
    if num_transitions < 1:
        raise ValueError(f"num_transitions must be >= 1, got {num_transitions}")
    if mode == "fraction":
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        n = max(1, int(num_transitions * fraction))
        rows = [torch.randperm(num_transitions, generator=generator)[:n] for _ in range(batch)]
    elif mode == "range":
        stop = num_transitions if end < 0 else end + 1
        if not 0 <= start < stop <= num_transitions or interval < 1:
            raise ValueError(f"bad range start={start} end={end} interval={interval} for {num_transitions} steps")
        base = torch.arange(start, stop, interval)
        rows = [base[torch.randperm(base.numel(), generator=generator)] for _ in range(batch)]
    else:
        raise ValueError(f"mode must be 'fraction' or 'range', got {mode!r}")
    if batch == 0:
        return torch.empty(0, 0, dtype=torch.long)
    return torch.stack(rows).to(torch.long)


def gather_steps(values: Tensor, indices: Tensor) -> Tensor:
    """``values[b, indices[b, j], ...]``: pick per-sample steps from a (B, K, ...) tensor -> (B, n, ...)."""
    idx = indices.to(device=values.device, dtype=torch.long)
    idx = idx.reshape(*idx.shape, *([1] * (values.ndim - 2))).expand(*idx.shape, *values.shape[2:])
    return torch.gather(values, 1, idx)


# ----------------------------------------------------------------------------------------------- losses
def clipped_policy_loss(
    logp_new: Tensor, logp_old: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, float]]:
    """PPO/GRPO clipped surrogate ``mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)))``, ``ρ = exp(logp_new − logp_old)``.

    ``logp_old`` is treated as data (detached). Stats: clip_fraction (share with ``|ρ−1| > ε``), ratio
    mean/min/max, and approx_kl = ``mean(½(logp_new − logp_old)²)``.
    """
    dtype = compute_dtype(logp_new, logp_old, advantages)
    new = logp_new.to(dtype)
    log_ratio = new - logp_old.detach().to(dtype)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(dtype)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        r = ratio.detach()
        stats = {
            "clip_fraction": float(((r - 1.0).abs() > clip_range).to(dtype).mean()),
            "ratio_mean": float(r.mean()),
            "ratio_min": float(r.min()),
            "ratio_max": float(r.max()),
            "approx_kl": float(0.5 * (log_ratio.detach() ** 2).mean()),
        }
    return loss, stats


def dual_reward_policy_loss(
    logp_new: Tensor, logp_old: Tensor, terms: list[tuple[float, Tensor]], clip_range: float
) -> tuple[Tensor, dict[str, float]]:
    """``Σ_t w_t · clipped_policy_loss(A_t)`` over the terms of :func:`advantage_terms`.

    Stats are those of the ratio (shared by all terms) plus ``loss/term{i}`` and ``clip_fraction/term{i}``.
    No terms gives a zero loss that still backpropagates (zero gradient).
    """
    dtype = compute_dtype(logp_new, logp_old)
    total = (logp_new.to(dtype) * 0.0).sum()
    stats: dict[str, float] = {}
    for i, (weight, adv) in enumerate(terms):
        loss, term_stats = clipped_policy_loss(logp_new, logp_old, adv, clip_range)
        total = total + weight * loss
        if i == 0:
            stats.update({k: v for k, v in term_stats.items() if k != "clip_fraction"})
        stats[f"loss/term{i}"] = float(loss.detach())
        stats[f"clip_fraction/term{i}"] = term_stats["clip_fraction"]
    return total, stats


def _reduce(per_element: Tensor, reduction: Reduction) -> Tensor:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    dims = tuple(range(1, per_element.ndim))
    if not dims:
        return per_element
    return per_element.mean(dim=dims) if reduction == "mean" else per_element.sum(dim=dims)


def gaussian_kl(mean_p: Tensor, mean_q: Tensor, std: ScalarLike, reduction: Reduction = "mean") -> Tensor:
    """Per-sample KL(N(μp, std²) ‖ N(μq, std²)) = ``‖μp − μq‖²/(2·std²)``, reduced per element by mean
    (consistent with the mean-reduced log-prob) or sum (the true KL of the joint). Returns (B,)."""
    dtype = compute_dtype(mean_p, mean_q, std)
    diff = mean_p.to(dtype) - mean_q.to(dtype)
    sd = expand_per_sample(std, diff, dtype)
    per_element = diff**2 / (2 * sd**2)
    return _reduce(per_element.expand(torch.broadcast_shapes(per_element.shape, diff.shape)), reduction)


def kl_to_reference(mean_new: Tensor, mean_ref: Tensor, std: ScalarLike, reduction: Reduction = "mean") -> Tensor:
    """KL of the trained unguided kernel to a frozen reference kernel at the same state (B,)."""
    return gaussian_kl(mean_new, mean_ref.detach(), std, reduction)


def upstream_velocity_kl(
    v_new: Tensor, v_ref: Tensor, sigma: ScalarLike, dt: ScalarLike, diffusion: ScalarLike,
    reduction: Reduction = "mean",
) -> Tensor:
    """Upstream's KL penalty ``mean((v_new − v_ref)²)·Δt/(2·g²·σ²)`` per sample (B,) (g = η for ``dance``).

    Not the KL of the two transition kernels (that is :func:`kl_to_reference` on their means, which here equals
    this times ``σ²·(1 + g²(1−σ)/(2σ))²``); kept for parity with upstream's ``KL_COEF``. As upstream, σ², g²
    and Δt are floored at 1e-8. ``v_ref`` is detached.
    """
    dtype = compute_dtype(v_new, v_ref, sigma, dt, diffusion)
    diff = v_new.to(dtype) - v_ref.detach().to(dtype)
    floor = torch.tensor(1e-8, dtype=dtype, device=diff.device)
    s2 = torch.maximum(expand_per_sample(sigma, diff, dtype) ** 2, floor)
    g2 = torch.maximum(expand_per_sample(diffusion, diff, dtype) ** 2, floor)
    step = torch.maximum(expand_per_sample(dt, diff, dtype), floor)
    per_element = diff**2 * step / (2 * g2 * s2)
    return _reduce(per_element.expand(torch.broadcast_shapes(per_element.shape, diff.shape)), reduction)


def distillation_loss_per_sample(
    mean_theta: Tensor, guided_target: Tensor, std: ScalarLike, reduction: Reduction = "mean"
) -> Tensor:
    """Per-sample (B,) ``‖μ_θ − sg(μ_guided,old)‖²/(2·std²)`` reduced over elements; squared error where std = 0.

    See :func:`distillation_loss` (its batch mean)."""
    dtype = compute_dtype(mean_theta, guided_target, std)
    diff = mean_theta.to(dtype) - guided_target.detach().to(dtype)
    sd = expand_per_sample(std, diff, dtype)
    positive = sd > 0
    denom = torch.where(positive, 2 * sd**2, torch.ones_like(sd))
    per_element = diff**2 / denom
    return _reduce(per_element.expand(torch.broadcast_shapes(per_element.shape, diff.shape)), reduction)


def distillation_loss(
    mean_theta: Tensor, guided_target: Tensor, std: ScalarLike, reduction: Reduction = "mean"
) -> Tensor:
    """Teach the unguided kernel the guided drift: ``mean_B[‖μ_θ − sg(μ_guided,old)‖²/(2·std²)]``.

    This is KL(guided kernel ‖ unguided kernel of θ) at the visited state, so minimising it moves the
    guidance into v_θ. Where std == 0 (``ode``) the KL is undefined; those samples fall back to the plain
    squared error ``‖μ_θ − target‖²`` (same reduction), which has the same minimiser.
    """
    return distillation_loss_per_sample(mean_theta, guided_target, std, reduction).mean()
