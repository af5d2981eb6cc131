"""Sampling maths of Euphonium: schedule, SDE drift, reward-gradient guidance (RGG), transition log-prob.

Pure functions on tensors, batched over samples (dim 0). Conventions (DESIGN.md section 3):
``x_σ = (1−σ)·x0 + σ·ε`` (σ=1 noise, σ=0 clean), the network predicts ``v ≈ ε − x0``, and ``x̂0 = x − σ·v``.
A step goes σ → σ_next with ``Δt = σ − σ_next > 0``.

Every ``sigma``-like argument may be a python float, a 0-d tensor or a per-sample tensor of shape (B,); it is
broadcast over the remaining dims of ``x`` by :func:`expand_per_sample`. Maths runs in fp32 even when inputs
are bf16/fp16 (the drift subtracts nearly equal numbers), and results are fp32 (fp64 inputs stay fp64, so
finite-difference tests can run in double precision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Any, Literal, Union

import torch
from torch import Tensor

__all__ = [
    "SDE",
    "NoiseType",
    "ScalarLike",
    "SDEStepOutput",
    "TimestepArithmetic",
    "compute_dtype",
    "diffusion_coefficient",
    "expand_per_sample",
    "flow_sigma_1",
    "guidance_shift",
    "guided_mean",
    "in_window",
    "kl_mode_scale",
    "network_timestep",
    "predicted_x0",
    "sde_step",
    "sigma_schedule",
    "step_std",
    "target_ratio_shift",
    "transition_log_prob",
    "unguided_mean",
]

NoiseType = Literal["dance", "flow", "ode"]
ScalarLike = Union[float, int, Tensor]
# "fp64": schedule in fp64 rounded once, timestep trunc(1000σ) of that exact value (our default);
# "fp32": upstream's arithmetic, schedule and product 1000σ both rounded in fp32 (sigma_schedule, network_timestep)
TimestepArithmetic = Literal["fp64", "fp32"]
_NOISE_TYPES = ("dance", "flow", "ode")
_ARITHMETICS = ("fp64", "fp32")


# ----------------------------------------------------------------------------------------------- helpers
def compute_dtype(*values: object) -> torch.dtype:
    """The dtype the maths runs in: at least fp32 (bf16/fp16/int promote to fp32), fp64 stays fp64."""
    dtypes = [v.dtype for v in values if isinstance(v, Tensor)]
    return reduce(torch.promote_types, dtypes, torch.float32)


def _as_tensor(value: ScalarLike, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(dtype=dtype, device=device if device is not None else value.device)
    return torch.tensor(float(value), dtype=dtype, device=device)


def expand_per_sample(value: ScalarLike, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Make a scalar / 0-d / per-sample (B,) value broadcast against ``x`` of shape (B, ...).

    A (B,) tensor becomes (B, 1, ..., 1); a scalar becomes a 0-d tensor; a tensor with ``x.ndim`` dims is
    returned as is (it must already broadcast). The result has ``dtype`` (default: the maths dtype of
    ``value`` and ``x``) and lives on ``x``'s device.
    """
    dtype = dtype or compute_dtype(value, x)
    t = _as_tensor(value, dtype, x.device)
    if t.ndim == 0 or t.ndim == x.ndim:
        return t
    if t.ndim == 1:
        if x.ndim == 0 or t.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"per-sample value has shape {tuple(t.shape)} but x has shape {tuple(x.shape)}")
        return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))
    raise ValueError(f"cannot broadcast a value of shape {tuple(t.shape)} per sample over x {tuple(x.shape)}")


def _check_noise_type(noise_type: str) -> None:
    if noise_type not in _NOISE_TYPES:
        raise ValueError(f"noise_type must be one of {_NOISE_TYPES}, got {noise_type!r}")


# ---------------------------------------------------------------------------------------------- schedule
def _check_arithmetic(arithmetic: str) -> None:
    if arithmetic not in _ARITHMETICS:
        raise ValueError(f"arithmetic must be one of {_ARITHMETICS}, got {arithmetic!r}")


def sigma_schedule(num_steps: int, shift: float, arithmetic: TimestepArithmetic = "fp64") -> Tensor:
    """SD3 time-shifted schedule ``σ_i = s·τ/(1+(s−1)·τ)``, ``τ = linspace(1, 0, N+1)``; float32 (N+1,).

    ``fp64`` (default): computed in fp64 and rounded once, so each σ is the fp32 nearest the formula's value.
    ``fp32``: upstream's arithmetic (an fp32 ``linspace`` on the CPU, then the formula in fp32); a few values
    differ from ``fp64`` by one ulp, which can move ``int(1000σ)`` by one. σ_0 = 1 and σ_N = 0 either way.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    _check_arithmetic(arithmetic)
    if arithmetic == "fp32":
        tau = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32)
        return (shift * tau) / (1 + (shift - 1) * tau)
    tau = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * tau / (1.0 + (shift - 1.0) * tau)).to(torch.float32)


def flow_sigma_1(schedule: Tensor) -> float:
    """The schedule's second value σ_1, which Flow-GRPO substitutes for σ=1 in ``σ/(1−σ)``."""
    if schedule.numel() < 2:
        raise ValueError("a schedule needs at least two values")
    return float(schedule[1])


def network_timestep(sigma: ScalarLike, arithmetic: TimestepArithmetic = "fp64") -> Tensor:
    """The integer timestep the network sees: ``int(1000·σ)``, truncated (0.5357… → 535), as a long tensor.

    ``fp64`` (default): the product is exact (taken in fp64), matching python's ``int(float(σ)*1000)`` on fp32
    schedules. ``fp32``: upstream's ``int(sigma * 1000)`` on an fp32 tensor, where the product is first rounded
    to fp32 (0.7f·1000 → 700.0 → 700, where the exact product 699.99998… gives 699).
    """
    _check_arithmetic(arithmetic)
    dtype = torch.float64 if arithmetic == "fp64" else torch.float32
    if isinstance(sigma, Tensor):
        s = sigma.detach().to(dtype)
    else:
        s = torch.tensor(float(sigma), dtype=dtype)
    return torch.trunc(s * 1000.0).to(torch.long)


# ------------------------------------------------------------------------------------------------ drift
def diffusion_coefficient(
    sigma: ScalarLike,
    noise_type: NoiseType,
    eta: float = 0.25,
    flow_a: float = 0.7,
    sigma_1: float | None = None,
) -> Tensor:
    """Diffusion coefficient g(σ) of the sampler, with the shape of ``sigma``.

    ``dance`` (DanceGRPO/Euphonium): constant η. ``flow`` (Flow-GRPO): ``a·√(σ/(1−σ))``; it is infinite at
    σ=1, so, like Flow-GRPO, σ_1 (the schedule's second value) replaces σ in the denominator there.
    ``ode``: 0 (deterministic Euler).
    """
    _check_noise_type(noise_type)
    s = _as_tensor(sigma, compute_dtype(sigma))
    if noise_type == "ode":
        return torch.zeros_like(s)
    if noise_type == "dance":
        return torch.full_like(s, float(eta))
    at_one = s == 1
    if sigma_1 is None:
        if bool(at_one.any()):
            raise ValueError("noise_type='flow' at sigma == 1 needs sigma_1 (see flow_sigma_1(schedule))")
        denom = 1 - s
    else:
        denom = 1 - torch.where(at_one, torch.as_tensor(float(sigma_1), dtype=s.dtype, device=s.device), s)
    return float(flow_a) * torch.sqrt(s / denom)


def predicted_x0(x: Tensor, v: Tensor, sigma: ScalarLike) -> Tensor:
    """``x̂0 = x − σ·v``: the clean sample the flow points at (fp32)."""
    dtype = compute_dtype(x, v, sigma)
    return x.to(dtype) - expand_per_sample(sigma, x, dtype) * v.to(dtype)


def unguided_mean(
    x: Tensor,
    v: Tensor,
    sigma: ScalarLike,
    sigma_next: ScalarLike,
    noise_type: NoiseType,
    eta: float = 0.25,
    flow_a: float = 0.7,
    sigma_1: float | None = None,
) -> Tensor:
    """Mean of the unguided transition: ``μ = x − Δt·v − ½g²·Δt·(x + (1−σ)·v)/σ``.

    The last term is the reverse-SDE score correction: the flow's score is ``−(x + (1−σ)v)/σ``, and adding
    ``½g²·score`` to the drift keeps the marginals of the ODE while injecting noise of std ``g√Δt``. For
    ``ode`` (g=0) this is the Euler step. At σ=0 the correction is undefined; it is taken as 0 (Euler)
    instead of dividing by zero (a sampler never starts a step at σ=0).
    """
    _check_noise_type(noise_type)
    dtype = compute_dtype(x, v, sigma, sigma_next)
    x32, v32 = x.to(dtype), v.to(dtype)
    s = expand_per_sample(sigma, x32, dtype)
    dt = s - expand_per_sample(sigma_next, x32, dtype)
    mean = x32 - dt * v32
    if noise_type == "ode":
        return mean
    g = diffusion_coefficient(s, noise_type, eta=eta, flow_a=flow_a, sigma_1=sigma_1)
    positive = s > 0
    safe_s = torch.where(positive, s, torch.ones_like(s))
    correction = 0.5 * g**2 * dt * (x32 + (1 - s) * v32) / safe_s
    return mean - torch.where(positive, correction, torch.zeros_like(correction))


def step_std(
    sigma: ScalarLike,
    sigma_next: ScalarLike,
    noise_type: NoiseType,
    eta: float = 0.25,
    flow_a: float = 0.7,
    sigma_1: float | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Std of the transition noise, ``g·√Δt``, with the shape of ``sigma`` (0 for ``ode``).

    Computed in the maths dtype of ``sigma``/``sigma_next``, promoted with ``dtype`` when given (pass the
    latents' dtype so that fp64 latents with a float σ get an fp64 std).
    """
    dtype = compute_dtype(sigma, sigma_next) if dtype is None else torch.promote_types(
        compute_dtype(sigma, sigma_next), dtype)
    s = _as_tensor(sigma, dtype)
    dt = s - _as_tensor(sigma_next, dtype, s.device)
    g = diffusion_coefficient(s, noise_type, eta=eta, flow_a=flow_a, sigma_1=sigma_1)
    return g * torch.sqrt(dt)


# ---------------------------------------------------------------------------------------------- guidance
def kl_mode_scale(eta: float, beta: float) -> float:
    """Guidance scale of "KL mode": ``c = η²/(2β)``, the tilt toward ``exp(r/β)`` for diffusion η."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return eta**2 / (2.0 * beta)


def guidance_shift(
    grad: Tensor,
    scale: ScalarLike,
    dt: ScalarLike,
    delta_t_scaling: bool,
    normalize: bool,
) -> Tensor:
    """The RGG shift added to the mean: ``c·(Δt if delta_t_scaling else 1)·g``.

    With ``normalize`` the gradient is first divided by its **per-sample** norm (over all non-batch dims),
    ``g/(‖g‖+1e-8)``. Upstream divides by the norm of the whole batch tensor; that only coincides at batch 1
    (upstream's rollouts), and it would let one sample's gradient shrink another's, so we normalise per sample.
    """
    dtype = compute_dtype(grad, scale, dt)
    g = grad.to(dtype)
    if normalize:
        dims = tuple(range(1, g.ndim))
        norm = torch.linalg.vector_norm(g, dim=dims, keepdim=True) if dims else g.abs()
        g = g / (norm + 1e-8)
    factor = expand_per_sample(scale, g, dtype)
    if delta_t_scaling:
        factor = factor * expand_per_sample(dt, g, dtype)
    return factor * g


def target_ratio_shift(grad: Tensor, ratio: ScalarLike, std: ScalarLike) -> Tensor:
    """A guidance shift whose length is ``ratio`` times the length of the step's noise draw, along ``grad``:
    ``ratio·std·√D·g/‖g‖`` per sample (D elements per sample; ``‖std·ξ‖ ≈ std·√D``). A zero gradient gives no
    shift; with std = 0 (ODE) there is no noise to measure against and the shift is 0.
    """
    dtype = compute_dtype(grad, ratio, std)
    g = grad.to(dtype)
    dims = tuple(range(1, g.ndim))
    if not dims:
        raise ValueError("target_ratio_shift needs per-sample gradients of shape (B, ...)")
    norm = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
    d = math.prod(g.shape[1:])
    length = expand_per_sample(ratio, g, dtype) * expand_per_sample(std, g, dtype) * math.sqrt(d)
    return torch.where(norm > 0, length * g / norm.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(g))


def guided_mean(
    mean: Tensor,
    grad: Tensor,
    scale: ScalarLike,
    dt: ScalarLike,
    delta_t_scaling: bool = True,
    normalize: bool = False,
) -> Tensor:
    """RGG: ``μ_guided = μ + guidance_shift(g, c, Δt)``, pushing the mean uphill on the reward."""
    shift = guidance_shift(grad, scale, dt, delta_t_scaling, normalize)
    return mean.to(compute_dtype(mean, shift)) + shift


def in_window(step: int, start: int, end: int | None, interval: int, num_steps: int) -> bool:
    """Whether step ``step`` gets guidance: ``start ≤ step < end`` and ``(step − start) % interval == 0``.

    ``end`` None or negative means ``num_steps`` (upstream's ``END_STEP=-1``).
    """
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    stop = num_steps if end is None or end < 0 else end
    return start <= step < stop and (step - start) % interval == 0


# ---------------------------------------------------------------------------------------------- log-prob
def transition_log_prob(
    x_next: Tensor,
    mean: Tensor,
    std: ScalarLike,
    reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """Gaussian log density ``log N(x_next; mean, std²)`` per element (constants included), reduced over all
    non-batch dims: ``mean`` (upstream; scale independent of the latent size) or ``sum`` (a true log-likelihood).

    ``x_next`` is detached: the sample is data, gradients flow through ``mean`` (and ``std``). Returns (B,).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    dtype = compute_dtype(x_next, mean, std)
    xn = x_next.detach().to(dtype)
    mu = mean.to(dtype)
    sd = expand_per_sample(std, mu, dtype)
    lp = -((xn - mu) ** 2) / (2 * sd**2) - torch.log(sd) - 0.5 * math.log(2 * math.pi)
    lp = lp.expand(torch.broadcast_shapes(lp.shape, xn.shape))
    dims = tuple(range(1, lp.ndim))
    if not dims:
        return lp
    return lp.mean(dim=dims) if reduction == "mean" else lp.sum(dim=dims)


# ------------------------------------------------------------------------------------------------- step
@dataclass
class SDEStepOutput:
    """One transition: the sample, both means, the noise std (shape of ``sigma``) and the log-prob (B,)."""

    x_next: Tensor
    mean_unguided: Tensor
    mean_guided: Tensor
    std: Tensor
    log_prob: Tensor


def sde_step(
    x: Tensor,
    v: Tensor,
    sigma: ScalarLike,
    sigma_next: ScalarLike,
    *,
    noise_type: NoiseType = "dance",
    eta: float = 0.25,
    flow_a: float = 0.7,
    sigma_1: float | None = None,
    guidance: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    logprob_mean: Literal["unguided", "guided"] = "unguided",
    reduction: Literal["mean", "sum"] = "mean",
) -> SDEStepOutput:
    """One sampler step: ``x' = μ_guided + std·ξ`` and its log-prob under the chosen reference mean.

    ``guidance`` is the already-computed shift (e.g. :func:`guidance_shift`, RGG plus SPSA), added to the
    unguided mean. By default the log-prob uses the **unguided** mean (upstream): the policy being trained
    is the unguided kernel, evaluated on guided transitions. ``noise`` (ξ) is drawn with ``generator`` when
    not given. For ``ode`` std is 0, ``x' = μ_guided`` and the log-prob is zeros (a point mass has none).
    """
    if logprob_mean not in ("unguided", "guided"):
        raise ValueError(f"logprob_mean must be 'unguided' or 'guided', got {logprob_mean!r}")
    mu = unguided_mean(x, v, sigma, sigma_next, noise_type, eta=eta, flow_a=flow_a, sigma_1=sigma_1)
    mu_g = mu if guidance is None else mu + guidance.to(mu.dtype)
    std = step_std(sigma, sigma_next, noise_type, eta=eta, flow_a=flow_a, sigma_1=sigma_1, dtype=mu.dtype)
    std = std.to(mu.device)
    if noise_type == "ode":
        return SDEStepOutput(mu_g, mu, mu_g, std, torch.zeros(x.shape[0], dtype=mu.dtype, device=mu.device))
    if noise is None:
        where = generator.device if generator is not None else mu.device  # same draws on CPU and GPU
        noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=where).to(mu.device)
    x_next = mu_g + expand_per_sample(std, mu, mu.dtype) * noise.to(mu.dtype)
    ref = mu if logprob_mean == "unguided" else mu_g
    log_prob = transition_log_prob(x_next, ref, std, reduction=reduction)
    return SDEStepOutput(x_next, mu, mu_g, std, log_prob)


# ------------------------------------------------------------------------------------------- the sampler
@dataclass(frozen=True)
class SDE:
    """The sampler's SDE as one value, the way a diffusers scheduler carries its settings: the noise type, η
    (``dance``), Flow-GRPO's level a (``flow``) and the schedule's σ_1 (what ``flow`` puts in the denominator at
    σ = 1). The rollout, the learner's log-prob and every diagnostic evaluate the same kernel through it."""

    noise_type: NoiseType = "dance"
    eta: float = 0.25
    flow_a: float = 0.7
    sigma_1: float | None = None

    def __post_init__(self) -> None:
        _check_noise_type(self.noise_type)

    @classmethod
    def on_schedule(cls, noise_type: NoiseType, eta: float, flow_a: float, sigmas: Tensor) -> "SDE":
        """The SDE of a sampler whose σ schedule is ``sigmas`` (σ_1 read from it)."""
        return cls(noise_type, float(eta), float(flow_a), flow_sigma_1(sigmas))

    def diffusion(self, sigma: ScalarLike) -> Tensor:
        """g(σ): :func:`diffusion_coefficient` of this sampler."""
        return diffusion_coefficient(sigma, self.noise_type, eta=self.eta, flow_a=self.flow_a, sigma_1=self.sigma_1)

    def mean(self, x: Tensor, v: Tensor, sigma: ScalarLike, sigma_next: ScalarLike) -> Tensor:
        """The unguided transition mean (:func:`unguided_mean`)."""
        return unguided_mean(x, v, sigma, sigma_next, self.noise_type, eta=self.eta, flow_a=self.flow_a,
                             sigma_1=self.sigma_1)

    def std(self, sigma: ScalarLike, sigma_next: ScalarLike, dtype: torch.dtype | None = None) -> Tensor:
        """The transition noise std ``g·√Δt`` (:func:`step_std`)."""
        return step_std(sigma, sigma_next, self.noise_type, eta=self.eta, flow_a=self.flow_a, sigma_1=self.sigma_1,
                        dtype=dtype)

    def step(self, x: Tensor, v: Tensor, sigma: ScalarLike, sigma_next: ScalarLike, **options: Any) -> SDEStepOutput:
        """One transition of this sampler: :func:`sde_step`, whose keywords (guidance, noise, generator,
        logprob_mean, reduction) ``options`` passes on."""
        return sde_step(x, v, sigma, sigma_next, noise_type=self.noise_type, eta=self.eta, flow_a=self.flow_a,
                        sigma_1=self.sigma_1, **options)
