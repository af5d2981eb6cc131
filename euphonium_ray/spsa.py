"""Zeroth-order (SPSA / Gaussian-smoothing) estimate of the outcome reward's gradient.

The pixel ORM is not differentiable through the decoder in practice, so its gradient at the predicted clean
latent ``x̂0 = x − σ·v`` is estimated from paired evaluations ``r(x̂0 ± δ·u)`` with ``u ~ N(0, I)``:
``ĝ = mean_n[(r₊ − r₋)/(2δ)·u]``. Then ``E[ĝ] = ∇r(x̂0) + O(δ²)`` (exactly ∇r for a quadratic r).

Like upstream, the caller adds ĝ to the step's mean as a gradient **with respect to x_i directly** (no chain
rule through ``x̂0(x_i) = x_i − σ_i·v_θ(x_i)``), with its own scale and window, through
:func:`euphonium_ray.sde.guidance_shift`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from euphonium_ray.sde import compute_dtype

__all__ = ["spsa_gradient"]


def spsa_gradient(
    score_fn: Callable[[Tensor], Tensor],
    x0_hat: Tensor,
    delta: float = 0.01,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    max_batch: int | None = None,
) -> Tensor:
    """Two-sided SPSA estimate of ``∇ score_fn`` at each sample of ``x0_hat`` (B, ...), fp32, same shape.

    ``score_fn`` maps a batch (M, ...) to scores (M,). All ``2·num_samples·B`` perturbed points go through
    it in one call (the + and − halves concatenated), or in chunks of ``max_batch`` rows when the scorer
    cannot take them all at once. ``x0_hat`` is detached: this is an estimate, not an autograd path.
    """
    if delta <= 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    dtype = compute_dtype(x0_hat)
    x = x0_hat.detach().to(dtype)
    batch = x.shape[0]
    # u: (n, B, ...) one direction per sample and draw.
    where = generator.device if generator is not None else x.device
    u = torch.randn((num_samples, *x.shape), generator=generator, dtype=dtype, device=where).to(x.device)
    plus = (x.unsqueeze(0) + delta * u).reshape(num_samples * batch, *x.shape[1:])
    minus = (x.unsqueeze(0) - delta * u).reshape(num_samples * batch, *x.shape[1:])
    points = torch.cat([plus, minus], dim=0)
    with torch.no_grad():
        if max_batch is None or max_batch >= points.shape[0]:
            scores = score_fn(points)
        else:
            if max_batch < 1:
                raise ValueError(f"max_batch must be >= 1, got {max_batch}")
            scores = torch.cat([score_fn(chunk) for chunk in points.split(max_batch, dim=0)])
    scores = scores.detach().to(dtype=dtype, device=x.device).reshape(-1)
    if scores.numel() != points.shape[0]:
        raise ValueError(f"score_fn returned {scores.numel()} scores for {points.shape[0]} inputs")
    r_plus, r_minus = scores.split(num_samples * batch)
    coeff = ((r_plus - r_minus) / (2.0 * delta)).reshape(num_samples, batch, *([1] * (x.ndim - 1)))
    return (coeff * u).mean(dim=0)
