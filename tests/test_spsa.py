"""Tests of euphonium_ray.spsa against analytic gradients."""

from __future__ import annotations

import pytest
import torch

from euphonium_ray.spsa import spsa_gradient


def _quadratic(dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=g)
    q = m @ m.T / dim + torch.eye(dim)  # symmetric positive definite
    b = torch.randn(dim, generator=g)
    return q, b


def test_spsa_converges_to_the_true_gradient_of_a_quadratic() -> None:
    q, b = _quadratic(16, 0)

    def reward(x: torch.Tensor) -> torch.Tensor:  # r(x) = −½xᵀQx + bᵀx, ∇r = −Qx + b
        return -0.5 * torch.einsum("bi,ij,bj->b", x, q, x) + x @ b

    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    est = spsa_gradient(reward, x, delta=0.01, num_samples=2000, generator=torch.Generator().manual_seed(2))
    true = -x @ q + b
    cos = torch.nn.functional.cosine_similarity(est, true, dim=1)
    assert torch.all(cos > 0.9), cos


def test_spsa_single_draw_is_the_exact_directional_derivative_times_u() -> None:
    # Central differences are exact on a quadratic: (r₊ − r₋)/(2δ) = u·∇r. The directions are recovered from
    # the points the scorer received, independently of how the implementation draws them.
    q, b = _quadratic(6, 3)
    seen: list[torch.Tensor] = []

    def reward(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return -0.5 * torch.einsum("bi,ij,bj->b", x, q, x) + x @ b

    x = torch.randn(3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    q, b = q.double(), b.double()
    est = spsa_gradient(lambda z: reward(z.reshape(-1, 6)), x, delta=0.1, num_samples=1,
                        generator=torch.Generator().manual_seed(5))
    assert len(seen) == 1 and seen[0].shape == (6, 6)  # + and − halves in one call
    u = (seen[0][:3] - x.reshape(3, 6)) / 0.1
    torch.testing.assert_close(seen[0][3:], x.reshape(3, 6) - 0.1 * u)
    grad = -x.reshape(3, 6) @ q + b
    expected = ((u * grad).sum(1, keepdim=True) * u).reshape(3, 2, 3)
    torch.testing.assert_close(est, expected)


def test_spsa_chunks_with_max_batch_give_the_same_estimate() -> None:
    calls: list[int] = []

    def reward(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return (x**3).sum(dim=(1, 2))

    x = torch.randn(2, 3, 4)
    full = spsa_gradient(reward, x, num_samples=5, generator=torch.Generator().manual_seed(6))
    assert calls == [20]
    calls.clear()
    chunked = spsa_gradient(reward, x, num_samples=5, generator=torch.Generator().manual_seed(6), max_batch=6)
    assert calls == [6, 6, 6, 2]
    torch.testing.assert_close(chunked, full)


def test_spsa_bf16_input_returns_fp32_and_rejects_bad_arguments() -> None:
    x = torch.randn(2, 4).bfloat16()
    est = spsa_gradient(lambda z: z.sum(1), x, generator=torch.Generator().manual_seed(7))
    assert est.dtype == torch.float32 and est.shape == (2, 4)
    ref = spsa_gradient(lambda z: z.sum(1), x.float(), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(est, ref, rtol=0, atol=0)
    with pytest.raises(ValueError):
        spsa_gradient(lambda z: z.sum(1), x, delta=0.0)
    with pytest.raises(ValueError, match="scores"):
        spsa_gradient(lambda z: z.sum(), x)
