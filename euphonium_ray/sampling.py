"""Rollouts: the reward-gradient-guided SDE sampler run over a whole batch of groups at once.

Upstream sampled one video at a time; here every sample of every group in the batch goes through the policy
network together (optionally in micro-batches), and the maths is the pure functions of ``sde.py`` and
``spsa.py``. ``sample_trajectories`` keeps everything the learner needs (see ``trajectory.py``);
``sample_latents`` is the same loop without bookkeeping, for evaluation and ``generate``.

Randomness comes from either one ``torch.Generator`` for the whole batch or one generator per sample. With
per-sample generators (seeded by :func:`sample_seed` from (run seed, step, prompt, member)), a sample's noise
does not depend on which other samples share its batch or which worker ran it, so a retried or re-split
rollout reproduces the same trajectory.
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable, Literal, Sequence, Union

import torch
from torch import Tensor

from euphonium_ray.config import GuidanceWindow, RGGConfig, SamplerConfig, SPSAConfig
from euphonium_ray.models.base import Policy, ProcessRewardModel, TextConditioning
from euphonium_ray.sde import guidance_shift, in_window, predicted_x0, target_ratio_shift
from euphonium_ray.spsa import spsa_gradient
from euphonium_ray.trajectory import Trajectories
from euphonium_ray.errors import EuphoniumError

__all__ = [
    "GeneratorLike",
    "ProcessRewardError",
    "ScoreAndGrad",
    "SpsaScoreFn",
    "make_generators",
    "sample_latents",
    "prompts_for_step",
    "sample_seed",
    "seeds_for",
    "sample_trajectories",
]

ScoreAndGrad = Callable[[Tensor, Tensor, TextConditioning], tuple[Tensor, Tensor]]
# SPSA scorer: perturbed x̂0 points (M, C, T, h, w) and, per point, the batch row it belongs to -> scores (M,)
SpsaScoreFn = Callable[[Tensor, Tensor], Tensor]
GeneratorLike = Union[torch.Generator, Sequence[torch.Generator], None]


class ProcessRewardError(EuphoniumError, RuntimeError):
    """The PRM failed at a sampling step; the message names the step and σ (the driver decides what to do)."""


# ---------------------------------------------------------------------------------------------- seeding
def sample_seed(run_seed: int, step: int, prompt_index: int, member: int) -> int:
    """A 63-bit seed for one sample, a pure function of (run seed, training step, prompt, group member)."""
    digest = hashlib.sha256(f"euphonium:{run_seed}:{step}:{prompt_index}:{member}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def prompts_for_step(step: int, num_prompts: int, per_step: int, seed: int) -> list[int]:
    """Prompt indices of a step: consecutive slices of a per-epoch permutation (a pure function of step)."""
    out = []
    for q in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(q, num_prompts)
        perm = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[i]))
    return out


def seeds_for(run_seed: int, step: int, prompts: list[int], group_size: int, num_prompts: int) -> list[int]:
    """Per-sample seeds from (run seed, step, prompt, member); a prompt repeated within a step gets new ones."""
    seen: dict[int, int] = {}
    seeds = []
    for p in prompts:
        key = p + num_prompts * seen.get(p, 0)
        seen[p] = seen.get(p, 0) + 1
        seeds.extend(sample_seed(run_seed, step, key, m) for m in range(group_size))
    return seeds


def make_generators(seeds: Sequence[int] | Tensor, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One seeded generator per sample."""
    values = seeds.tolist() if isinstance(seeds, Tensor) else list(seeds)
    return [torch.Generator(device=device).manual_seed(int(s)) for s in values]


class _NoiseSource:
    """Standard normal draws for a batch, from one shared generator or one generator per row.

    With per-row generators and ``draws`` known, every row's draws for the whole trajectory are taken at once
    (one call per row instead of one per row and step: on a GPU the per-step calls cost more than the network) and
    moved to the device in one copy; each later ``batch_noise`` returns the next slice. A row's stream is consumed
    in the same order either way, so for CPU generators and latent sizes that are multiples of 16 (torch fills
    normals in blocks of 16) the numbers are the same as drawing step by step.
    """

    def __init__(self, generator: GeneratorLike, batch: int, draws: int = 0, shape: tuple[int, ...] | None = None,
                 device: torch.device | None = None) -> None:
        if generator is not None and not isinstance(generator, torch.Generator):
            gens = list(generator)
            if len(gens) != batch:
                raise ValueError(f"got {len(gens)} per-sample generators for a batch of {batch}")
            self.per_row: list[torch.Generator] | None = gens
            self.shared: torch.Generator | None = None
        else:
            self.per_row, self.shared = None, generator
        self.batch = batch
        self.prefetched: Tensor | None = None
        self.cursor = 0
        if self.per_row is not None and draws > 0 and shape is not None and device is not None:
            self.prefetched = torch.stack([torch.randn((draws, *shape), generator=g, device=g.device)
                                           for g in self.per_row]).to(device)
            self.shape = tuple(shape)

    def first(self) -> torch.Generator | None:
        return self.per_row[0] if self.per_row is not None else self.shared

    def rows(self, rows: Sequence[int], shape: tuple[int, ...], device: torch.device) -> Tensor:
        """(len(rows), *shape) draws; with per-row generators row r uses generator r."""
        if self.per_row is None:
            where = self.shared.device if self.shared is not None else device  # a CPU generator draws on CPU
            return torch.randn((len(rows), *shape), generator=self.shared, device=where).to(device)
        return torch.stack([torch.randn(shape, generator=self.per_row[r], device=self.per_row[r].device)
                            for r in rows]).to(device)

    def batch_noise(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        if self.prefetched is not None and tuple(shape) == self.shape and self.cursor < self.prefetched.shape[1]:
            out = self.prefetched[:, self.cursor].to(device)
            self.cursor += 1
            return out
        return self.rows(range(self.batch), shape, device)


def _initial_noise(noise: _NoiseSource, latent_shape: tuple[int, ...], group_size: int, same: bool,
                   device: torch.device) -> Tensor:
    """x_0: one draw per sample, or (upstream's ``use_same_noise``) the group leader's draw for all G members.

    Every row draws once either way, so each per-sample stream is at the same place when the SDE starts."""
    x = noise.batch_noise(latent_shape, device)
    if not same:
        return x
    return x[::group_size].repeat_interleave(group_size, 0)


# ---------------------------------------------------------------------------------------------- pieces
ScoreOnly = Callable[[Tensor, Tensor, TextConditioning], Tensor]


def _prm_callables(prm: ProcessRewardModel | ScoreAndGrad | None) -> tuple[ScoreAndGrad | None, ScoreOnly | None]:
    """(score_and_grad, score) of a PRM; a bare callable gives score-and-grad, and its score drops the gradient."""
    if prm is None:
        return None, None
    if hasattr(prm, "score_and_grad"):
        score_only = getattr(prm, "score", None)
        return prm.score_and_grad, score_only  # type: ignore[union-attr]
    if callable(prm):
        return prm, lambda x, s, c: prm(x, s, c)[0]
    raise TypeError(f"prm must be a ProcessRewardModel or a callable, got {type(prm).__name__}")


def _velocity(policy: Policy, x: Tensor, sigma: float, cond: TextConditioning, micro_batch: int | None) -> Tensor:
    """v(x, σ) in fp32 under no_grad, in micro-batches when asked."""
    b = x.shape[0]
    step = b if not micro_batch or micro_batch >= b else micro_batch
    out = []
    with torch.no_grad():
        for start in range(0, b, step):
            sl = slice(start, start + step)
            sig = torch.full((x[sl].shape[0],), float(sigma), device=x.device)
            out.append(policy.velocity(x[sl], sig, cond.index(sl)).float())
    return torch.cat(out)


def _window_on(win: GuidanceWindow, step: int, num_steps: int) -> bool:
    return bool(win.enabled) and in_window(step, win.start, win.end, win.interval, num_steps)


def _check_scores(score: Tensor, x: Tensor, step: int, grad: Tensor | None = None) -> Tensor:
    score = torch.as_tensor(score).reshape(-1).to(device=x.device, dtype=torch.float32)
    if score.shape[0] != x.shape[0] or (grad is not None and grad.shape != x.shape):
        got = f"score {tuple(score.shape)}" + ("" if grad is None else f" and grad {tuple(grad.shape)}")
        raise ProcessRewardError(f"PRM at step {step} returned {got} for latents {tuple(x.shape)}")
    return score


def _prm_score(score_fn: ScoreOnly, x: Tensor, sigma: float, cond: TextConditioning, step: int) -> Tensor:
    """Process reward of x at σ without a gradient (steps that record a reward but shift nothing)."""
    sig = torch.full((x.shape[0],), float(sigma), device=x.device)
    try:
        with torch.no_grad():
            score = score_fn(x, sig, cond)
    except Exception as exc:  # noqa: BLE001 - re-raised with the step named
        raise ProcessRewardError(f"PRM failed at sampling step {step} (sigma={sigma:.4f}): {exc!r}") from exc
    return _check_scores(score, x, step)


def _prm_guidance(
    score_and_grad: ScoreAndGrad, x: Tensor, sigma: float, dt: float, cond: TextConditioning, rgg: GuidanceWindow,
    scale: float, step: int, std: Tensor, guided_rows: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """(shift, score (B,), grad norm (B,)) of RGG at one step. Exceptions become ProcessRewardError; a sample
    whose gradient is not finite gets no shift and a NaN score, so its group is skipped downstream. Rows not in
    ``guided_rows`` get no shift (their score is still recorded)."""
    sig = torch.full((x.shape[0],), float(sigma), device=x.device)
    try:
        score, grad = score_and_grad(x, sig, cond)
    except Exception as exc:  # noqa: BLE001 - re-raised with the step named
        raise ProcessRewardError(f"PRM failed at sampling step {step} (sigma={sigma:.4f}): {exc!r}") from exc
    grad = torch.as_tensor(grad).to(device=x.device, dtype=torch.float32)
    score = _check_scores(score, x, step, grad)
    dims = tuple(range(1, grad.ndim))
    finite = torch.isfinite(grad).all(dim=dims) if dims else torch.isfinite(grad)
    grad = torch.where(finite.reshape(-1, *([1] * (grad.ndim - 1))), grad, torch.zeros((), device=grad.device))
    score = torch.where(finite, score, torch.full_like(score, float("nan")))
    norms = torch.linalg.vector_norm(grad, dim=dims) if dims else grad.abs()
    if rgg.scale_mode == "target_ratio":
        shift = target_ratio_shift(grad, rgg.target_ratio, std)
    else:
        shift = guidance_shift(grad, scale, dt, rgg.delta_t_scaling, rgg.normalize)
    shift = shift * guided_rows.reshape(-1, *([1] * (shift.ndim - 1))).to(shift.dtype)
    return shift, score, norms


def _spsa_guidance(
    score_fn: SpsaScoreFn, x: Tensor, v: Tensor, sigma: float, dt: float, spsa: SPSAConfig, scale: float,
    generator: torch.Generator | None,
) -> Tensor:
    """SPSA shift from the outcome reward around x̂0 = x − σ·v (applied to the mean like RGG)."""
    b = x.shape[0]
    rows = torch.arange(b, device=x.device).repeat(2 * spsa.num_samples)
    x0_hat = predicted_x0(x, v, sigma)
    g = spsa_gradient(lambda pts: score_fn(pts, rows[: pts.shape[0]]), x0_hat, delta=spsa.sigma,
                      num_samples=spsa.num_samples, generator=generator)
    return guidance_shift(g, scale, dt, spsa.delta_t_scaling, spsa.normalize)


def _add_time(timings: dict[str, float] | None, key: str, start: float) -> None:
    if timings is not None:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


# ----------------------------------------------------------------------------------------------- public
def sample_trajectories(
    policy: Policy,
    cond: TextConditioning,
    *,
    sampler: SamplerConfig,
    rgg: RGGConfig,
    spsa: SPSAConfig,
    prm: ProcessRewardModel | ScoreAndGrad | None,
    latent_shape: Sequence[int],
    group_size: int,
    generator: GeneratorLike = None,
    spsa_score_fn: SpsaScoreFn | None = None,
    initial_noise: Tensor | None = None,
    same_initial_noise: bool = True,
    logprob_mean: Literal["unguided", "guided"] = "unguided",
    reduction: Literal["mean", "sum"] = "mean",
    micro_batch: int | None = None,
    prompt_indices: Sequence[int] | Tensor | None = None,
    sample_seeds: Sequence[int] | Tensor | None = None,
    captions: Sequence[str] | None = None,
    weight_version: int = 0,
    timings: dict[str, float] | None = None,
    output_rewards: bool = False,
) -> Trajectories:
    """Sample B = len(cond) trajectories (contiguous groups of ``group_size``) with the guided SDE.

    Per step i: ``v = policy.velocity(x_i, σ_i)`` (no grad); in the RGG window the PRM's (score, ∇) at the
    step's input latent x_i gives the shift (``c·Δt·∇`` with c = ``rgg.effective_scale(η)``, or a fixed ratio of
    the step's noise in ``target_ratio`` mode) on the guided members of each group, and the process reward of x_i
    for all; in the SPSA window the ORM's zeroth-order gradient at x̂0 adds its own shift; the sample is drawn
    from the guided mean and its log-prob is taken under ``logprob_mean``. Where guidance can shift nothing
    (scale 0, no guided member) the PRM is only scored, not differentiated. ``output_rewards`` also records the
    process reward of every windowed transition's output x_{k+1} (``process_rewards_next``; x_N at σ = 0).
    Deterministic given the generator(s). ``timings`` (optional) accumulates seconds spent in ``policy``,
    ``prm`` and ``spsa``.
    """
    b = len(cond)
    if b % group_size != 0:
        raise ValueError(f"batch of {b} conditionings is not a whole number of groups of {group_size}")
    if captions is not None and cond.captions is None:
        cond = cond.with_captions(list(captions))
    score_and_grad, score_only = _prm_callables(prm)
    if rgg.enabled and score_and_grad is None:
        raise ValueError("rgg.enabled is true but no process reward model was given (set rgg.enabled=false)")
    if spsa.enabled and spsa_score_fn is None:
        raise ValueError("spsa.enabled is true but no SPSA score function (outcome reward) was given")
    device = cond.prompt_embeds.device
    shape = tuple(int(s) for s in latent_shape)
    n = sampler.num_steps
    sigmas = sampler.schedule()
    sde = sampler.sde(sigmas)
    draws = (0 if initial_noise is not None else 1) + (0 if sampler.noise_type == "ode" else n)
    noise = _NoiseSource(generator, b, draws=draws, shape=shape, device=device)
    rgg_scale = rgg.effective_scale(sampler.eta)
    spsa_scale = spsa.effective_scale(sampler.eta)
    guided_rows = (torch.arange(b, device=device) % group_size) < rgg.guided_members(group_size)
    differentiate = rgg.shifts_anything or score_only is None  # else only score: no shift to compute
    window = [i for i in range(n) if score_and_grad is not None and _window_on(rgg, i, n)]
    record_next = output_rewards and bool(window)

    x = initial_noise.to(device=device, dtype=torch.float32) if initial_noise is not None else \
        _initial_noise(noise, shape, group_size, same_initial_noise, device)
    if tuple(x.shape) != (b, *shape):
        raise ValueError(f"initial noise has shape {tuple(x.shape)}, expected {(b, *shape)}")
    path = [x]
    log_probs = torch.zeros(b, n, device=device)
    process_rewards = torch.zeros(b, n, device=device)
    evaluated = torch.zeros(b, n, dtype=torch.bool, device=device)
    rewards_next = torch.zeros(b, n, device=device)
    evaluated_next = torch.zeros(b, n, dtype=torch.bool, device=device)
    grad_norms = torch.zeros(b, n, device=device)
    guided_steps: list[int] = []
    guided_means: list[Tensor] = []
    shifts: list[Tensor] = []
    x0_hat_final = x
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        dt = s - s_next
        t0 = time.perf_counter()
        v = _velocity(policy, x, s, cond, micro_batch)
        _add_time(timings, "policy", t0)
        shift: Tensor | None = None
        state_score: Tensor | None = None
        if i in window:
            t0 = time.perf_counter()
            if differentiate:
                shift, state_score, norms = _prm_guidance(score_and_grad, x, s, dt, cond, rgg, rgg_scale, i,
                                                          sde.std(s, s_next).to(device), guided_rows)
                grad_norms[:, i] = norms
            else:
                state_score = _prm_score(score_only, x, s, cond, i)  # type: ignore[arg-type]
            process_rewards[:, i], evaluated[:, i] = state_score, True
            _add_time(timings, "prm", t0)
        if record_next and i - 1 in window:  # x_i is the output of windowed transition i-1
            if state_score is None:
                t0 = time.perf_counter()
                state_score = _prm_score(score_only or (lambda a, b_, c: score_and_grad(a, b_, c)[0]), x, s, cond, i)
                _add_time(timings, "prm", t0)
            rewards_next[:, i - 1], evaluated_next[:, i - 1] = state_score, True
        if spsa_score_fn is not None and _window_on(spsa, i, n):
            t0 = time.perf_counter()
            extra = _spsa_guidance(spsa_score_fn, x, v, s, dt, spsa, spsa_scale, noise.first())
            shift = extra if shift is None else shift + extra
            _add_time(timings, "spsa", t0)
        xi = None if sampler.noise_type == "ode" else noise.batch_noise(shape, device)
        out = sde.step(x, v, s, s_next, guidance=shift, noise=xi, logprob_mean=logprob_mean, reduction=reduction)
        if shift is not None:
            guided_steps.append(i)
            guided_means.append(out.mean_guided)
            shifts.append(shift.float())
        log_probs[:, i] = out.log_prob
        if i == n - 1:
            x0_hat_final = predicted_x0(x, v, s)
        x = out.x_next.float()
        path.append(x)
    if record_next and n - 1 in window:  # the last transition's output is the final sample, at σ = 0
        t0 = time.perf_counter()
        last = _prm_score(score_only or (lambda a, b_, c: score_and_grad(a, b_, c)[0]), x, 0.0, cond, n)
        rewards_next[:, n - 1], evaluated_next[:, n - 1] = last, True
        _add_time(timings, "prm", t0)

    empty = torch.zeros(b, 0, *shape, device=device)
    return Trajectories(
        latents=torch.stack(path, 1),
        sigmas=sigmas.to(device),
        log_probs=log_probs,
        process_rewards=process_rewards,
        process_evaluated=evaluated,
        guidance_norms=grad_norms,
        guided_steps=torch.tensor(guided_steps, dtype=torch.long, device=device),
        guided_means=torch.stack(guided_means, 1) if guided_means else empty,
        guidance_shifts=torch.stack(shifts, 1) if shifts else empty.clone(),
        x0_hat_final=x0_hat_final.float(),
        group_ids=torch.arange(b, device=device) // group_size,
        prompt_indices=_long(prompt_indices, b, device, default=torch.arange(b, device=device) // group_size),
        sample_seeds=_long(sample_seeds, b, device, default=torch.zeros(b, dtype=torch.long, device=device)),
        cond=cond,
        captions=list(captions) if captions is not None else [],
        group_size=group_size,
        weight_version=weight_version,
        process_rewards_next=rewards_next if record_next else None,
        process_evaluated_next=evaluated_next if record_next else None,
        guided_rows=guided_rows if (window and rgg.guided_fraction < 1) else None,
    )


def _long(values: Sequence[int] | Tensor | None, b: int, device: torch.device, default: Tensor) -> Tensor:
    if values is None:
        return default
    t = torch.as_tensor(values, dtype=torch.long, device=device).reshape(-1)
    if t.numel() != b:
        raise ValueError(f"expected {b} per-sample values, got {t.numel()}")
    return t


def sample_latents(
    policy: Policy,
    cond: TextConditioning,
    *,
    latent_shape: Sequence[int],
    num_steps: int = 16,
    shift: float = 5.0,
    noise_type: Literal["dance", "flow", "ode"] = "ode",
    eta: float = 0.25,
    flow_a: float = 0.7,
    generator: GeneratorLike = None,
    initial_noise: Tensor | None = None,
    prm: ProcessRewardModel | ScoreAndGrad | None = None,
    rgg: RGGConfig | None = None,
    micro_batch: int | None = None,
) -> Tensor:
    """Final latents x_N of plain sampling (ODE by default; SDE; or RGG on every row when ``prm`` and ``rgg`` are
    given): :func:`sample_trajectories`' loop, one sample per group, its bookkeeping dropped."""
    sampler = SamplerConfig(num_steps=num_steps, shift=shift, noise_type=noise_type, eta=eta, flow_a=flow_a,
                            group_size=1, same_initial_noise=False)
    guided = prm is not None and rgg is not None and rgg.enabled
    window = rgg.model_copy(update={"guided_fraction": 1.0}) if guided else RGGConfig(enabled=False)  # type: ignore[union-attr]
    traj = sample_trajectories(policy, cond, sampler=sampler, rgg=window, spsa=SPSAConfig(enabled=False),
                               prm=prm if guided else None, latent_shape=latent_shape, group_size=1,
                               generator=generator, initial_noise=initial_noise, same_initial_noise=False,
                               micro_batch=micro_batch)
    return traj.latents[:, -1]
