"""Tests of euphonium_ray.sde against independent computations (closed forms, torch.distributions, formulas
of DanceGRPO / Flow-GRPO written out here), never against saved outputs."""

from __future__ import annotations

import math

import pytest
import torch

from euphonium_ray.sde import (
    diffusion_coefficient,
    expand_per_sample,
    flow_sigma_1,
    guidance_shift,
    guided_mean,
    in_window,
    kl_mode_scale,
    network_timestep,
    predicted_x0,
    sde_step,
    sigma_schedule,
    step_std,
    transition_log_prob,
    unguided_mean,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------- schedule
def test_schedule_matches_upstream_table() -> None:
    s = sigma_schedule(16, 5.0)
    assert s.dtype == torch.float32 and s.shape == (17,)
    assert s[0].item() == 1.0 and s[-1].item() == 0.0
    assert s[12].item() == pytest.approx(0.625, abs=1e-7)
    assert s[15].item() == pytest.approx(0.25, abs=1e-7)
    assert s[13].item() == pytest.approx(0.5357142857, abs=1e-6)
    assert (s[0] - s[1]).item() == pytest.approx(0.0132, abs=5e-5)
    assert int(network_timestep(s[13])) == 535  # truncated, not rounded (535.71...)
    expected = [1000, 986, 972, 955, 937, 916, 892, 865, 833, 795, 750, 694, 625, 535, 416, 250, 0]
    assert network_timestep(s).tolist() == expected
    assert network_timestep(s).dtype == torch.long
    tau = [1 - i / 16 for i in range(17)]
    assert s.tolist() == pytest.approx([5 * t / (1 + 4 * t) for t in tau], abs=1e-7)


def test_network_timestep_truncates_python_floats_and_batches() -> None:
    assert int(network_timestep(0.9999)) == 999
    assert network_timestep(torch.tensor([0.2509, 0.0])).tolist() == [250, 0]


def test_flow_sigma_1_is_second_schedule_value() -> None:
    s = sigma_schedule(16, 5.0)
    assert flow_sigma_1(s) == pytest.approx(float(s[1]))


def test_in_window_upstream_defaults_gives_steps_12_to_15() -> None:
    assert {i for i in range(16) if in_window(i, 12, -1, 1, 16)} == {12, 13, 14, 15}
    assert {i for i in range(16) if in_window(i, 12, None, 1, 16)} == {12, 13, 14, 15}
    assert {i for i in range(16) if in_window(i, 3, 10, 3, 16)} == {3, 6, 9}
    with pytest.raises(ValueError):
        in_window(0, 0, None, 0, 16)


# ---------------------------------------------------------------------------------------------- log-prob
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_equals_torch_normal(reduction: str) -> None:
    g = _gen(1)
    mean = torch.randn(4, 3, 5, generator=g)
    x_next = mean + 0.3 * torch.randn(4, 3, 5, generator=g)
    std = torch.tensor([0.1, 0.2, 0.3, 0.4])
    ours = transition_log_prob(x_next, mean, std, reduction=reduction)  # type: ignore[arg-type]
    ref = torch.distributions.Normal(mean, std.view(4, 1, 1)).log_prob(x_next)
    ref = ref.mean(dim=(1, 2)) if reduction == "mean" else ref.sum(dim=(1, 2))
    torch.testing.assert_close(ours, ref)
    scalar = transition_log_prob(x_next, mean, 0.2, reduction=reduction)  # type: ignore[arg-type]
    ref2 = torch.distributions.Normal(mean, 0.2).log_prob(x_next)
    torch.testing.assert_close(scalar, ref2.mean(dim=(1, 2)) if reduction == "mean" else ref2.sum(dim=(1, 2)))


def test_log_prob_detaches_x_next_and_differentiates_mean() -> None:
    mean = torch.zeros(2, 3, requires_grad=True)
    x_next = torch.ones(2, 3, requires_grad=True)
    transition_log_prob(x_next, mean, 0.5).sum().backward()
    assert x_next.grad is None
    torch.testing.assert_close(mean.grad, torch.full((2, 3), 1.0 / 0.25 / 3))  # (x−μ)/std² / D


# ------------------------------------------------------------------------------------ special cases of μ
def test_dance_reproduces_dancegrpo_flux_step() -> None:
    g = _gen(2)
    x, v, xi = (torch.randn(3, 2, 4, generator=g) for _ in range(3))
    sched = sigma_schedule(16, 5.0)
    eta = 0.25
    for i in range(16):
        sigma, sigma_next = float(sched[i]), float(sched[i + 1])
        # DanceGRPO flux_step, written out: Euler mean, then the score correction, dσ < 0.
        dsigma = sigma_next - sigma
        x0_hat = x - sigma * v
        score = -(x - x0_hat * (1 - sigma)) / sigma**2
        mu = x + dsigma * v
        mu = mu + (-0.5 * eta**2 * score) * dsigma
        std = eta * math.sqrt(-dsigma)
        out = sde_step(x, v, sigma, sigma_next, noise_type="dance", eta=eta, noise=xi)
        torch.testing.assert_close(out.mean_unguided, mu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.x_next, mu + std * xi, rtol=1e-5, atol=1e-6)
        assert float(out.std) == pytest.approx(std, rel=1e-6)
        torch.testing.assert_close(predicted_x0(x, v, sigma), x0_hat)


def test_flow_reproduces_flow_grpo_sde_step() -> None:
    g = _gen(3)
    x, v, xi = (torch.randn(3, 6, generator=g) for _ in range(3))
    sched = sigma_schedule(16, 5.0)
    a = 0.7
    sigma_max = float(sched[1])
    for i in range(16):
        sigma, sigma_next = float(sched[i]), float(sched[i + 1])
        # Flow-GRPO sde_step_with_logprob, written out (dt < 0; σ=1 replaced by sigmas[1] in the denominator).
        dt = sigma_next - sigma
        std_dev_t = a * math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
        mu = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        std = std_dev_t * math.sqrt(-dt)
        prev = mu + std * xi
        log_prob = (-((prev - mu) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))).mean(1)
        out = sde_step(x, v, sigma, sigma_next, noise_type="flow", flow_a=a, sigma_1=flow_sigma_1(sched), noise=xi)
        torch.testing.assert_close(out.mean_unguided, mu, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.x_next, prev, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.log_prob, log_prob, rtol=1e-5, atol=1e-4)
        assert float(diffusion_coefficient(sigma, "flow", flow_a=a, sigma_1=sigma_max)) == pytest.approx(std_dev_t)


def test_flow_at_sigma_one_needs_sigma_1() -> None:
    with pytest.raises(ValueError, match="sigma_1"):
        diffusion_coefficient(1.0, "flow")


def test_ode_is_euler_with_zero_log_prob() -> None:
    g = _gen(4)
    x, v = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    state = g.get_state()
    out = sde_step(x, v, 0.7, 0.6, noise_type="ode", generator=g)
    torch.testing.assert_close(out.x_next, x - 0.1 * v)
    torch.testing.assert_close(out.mean_unguided, x - 0.1 * v)
    assert torch.equal(out.log_prob, torch.zeros(2)) and float(out.std) == 0.0
    assert torch.equal(g.get_state(), state)  # no noise drawn
    assert float(step_std(0.7, 0.6, "ode")) == 0.0


def test_sigma_zero_does_not_divide_by_zero() -> None:
    x, v = torch.ones(2, 3), torch.ones(2, 3)
    for kind in ("dance", "flow"):
        sig, nxt = torch.tensor([0.0, 0.5]), torch.tensor([0.0, 0.25])
        mu = unguided_mean(x, v, sig, nxt, kind, sigma_1=0.9)  # type: ignore[arg-type]
        assert torch.isfinite(mu).all()


def _gaussian_velocity(x: torch.Tensor, sigma: float, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Exact rectified-flow velocity E[ε − x0 | x_σ] for data N(m, s²) (independent per dimension)."""
    a = 1 - sigma
    var = a**2 * s**2 + sigma**2
    return (sigma - a * s**2) * (x - a * m) / var - m


def test_ode_transports_gaussian_to_closed_form() -> None:
    # Data N(m, s²): the probability-flow ODE maps noise ε to m + s·ε exactly. Euler (first order)
    # converges to that map: the error is small and shrinks ~4x when the step count grows 4x.
    m = torch.tensor([1.5, -0.5, 0.0, 3.0], dtype=torch.float64)
    s = torch.tensor([0.5, 2.0, 1.0, 0.1], dtype=torch.float64)
    eps = torch.randn(64, 4, generator=_gen(5), dtype=torch.float64)
    errors = []
    for n in (250, 1000):
        sched = sigma_schedule(n, 3.0)
        x = eps.clone()
        for i in range(n):
            sigma, sigma_next = float(sched[i]), float(sched[i + 1])
            x = sde_step(x, _gaussian_velocity(x, sigma, m, s), sigma, sigma_next, noise_type="ode").x_next
        errors.append(float((x - (m + s * eps)).abs().max()))
    assert errors[1] < 1e-2
    assert 3.0 < errors[0] / errors[1] < 5.0


@pytest.mark.parametrize("noise_type", ["dance", "flow"])
def test_sde_preserves_gaussian_marginals(noise_type: str) -> None:
    # The reverse SDE with the exact score keeps the ODE's marginals: final samples are N(m, s²).
    m, s = 1.0, 0.5
    mt, st = torch.tensor(m, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    g = _gen(6)
    sched = sigma_schedule(400, 1.0)
    x = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    for i in range(400):
        sigma, sigma_next = float(sched[i]), float(sched[i + 1])
        v = _gaussian_velocity(x, sigma, mt, st)
        out = sde_step(x, v, sigma, sigma_next, noise_type=noise_type,  # type: ignore[arg-type]
                       eta=0.7, flow_a=0.7, sigma_1=flow_sigma_1(sched), generator=g)
        x = out.x_next
    assert float(x.mean()) == pytest.approx(m, abs=0.02)
    assert float(x.std()) == pytest.approx(s, abs=0.02)  # without the score correction: 0.79


# ------------------------------------------------------------------------------------------------ RGG
def test_guidance_shift_equals_c_dt_grad_and_raises_expected_reward() -> None:
    g = _gen(7)
    a = torch.randn(8, generator=g)
    x = torch.randn(512, 8, generator=g)
    v = torch.randn(512, 8, generator=g)
    xi = torch.randn(512, 8, generator=g)
    x_req = x.clone().requires_grad_(True)
    reward = -((x_req - a) ** 2).sum(-1)
    (grad,) = torch.autograd.grad(reward.sum(), x_req)
    torch.testing.assert_close(grad, -2 * (x - a))
    sigma, sigma_next, c = 0.625, 0.5357142857, 1.0
    dt = sigma - sigma_next
    shift = guidance_shift(grad, c, dt, delta_t_scaling=True, normalize=False)
    torch.testing.assert_close(shift, c * dt * grad)
    torch.testing.assert_close(guidance_shift(grad, c, dt, delta_t_scaling=False, normalize=False), c * grad)
    mu = unguided_mean(x, v, sigma, sigma_next, "dance")
    torch.testing.assert_close(guided_mean(mu, grad, c, dt), mu + c * dt * grad)
    plain = sde_step(x, v, sigma, sigma_next, noise_type="dance", noise=xi)
    guided = sde_step(x, v, sigma, sigma_next, noise_type="dance", noise=xi, guidance=shift)
    r_plain = -((plain.x_next - a) ** 2).sum(-1).mean()
    r_guided = -((guided.x_next - a) ** 2).sum(-1).mean()
    assert r_guided > r_plain
    torch.testing.assert_close(guided.x_next - plain.x_next, shift)


def test_normalized_shift_is_unit_norm_per_sample_times_c_dt() -> None:
    grad = torch.randn(4, 3, 5, generator=_gen(8)) * torch.tensor([1e-3, 1.0, 10.0, 1e3]).view(4, 1, 1)
    dt = torch.tensor([0.1, 0.2, 0.3, 0.4])
    shift = guidance_shift(grad, 0.5, dt, delta_t_scaling=True, normalize=True)
    norms = shift.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, 0.5 * dt, rtol=1e-5, atol=1e-7)
    cos = torch.nn.functional.cosine_similarity(shift.flatten(1), grad.flatten(1), dim=1)
    torch.testing.assert_close(cos, torch.ones(4))
    assert torch.equal(guidance_shift(torch.zeros(2, 3), 1.0, 0.1, True, True), torch.zeros(2, 3))


def test_kl_mode_scale_upstream_value() -> None:
    assert kl_mode_scale(0.25, 3.125) == pytest.approx(0.01)
    assert kl_mode_scale(0.25, 3.125) == pytest.approx(0.25**2 / (2 * 3.125))


def test_logprob_mean_choice_unguided_or_guided() -> None:
    g = _gen(9)
    x, v, xi, shift = (torch.randn(3, 4, generator=g) for _ in range(4))
    std = 0.25 * math.sqrt(0.1)
    un = sde_step(x, v, 0.6, 0.5, noise_type="dance", guidance=shift, noise=xi)
    gu = sde_step(x, v, 0.6, 0.5, noise_type="dance", guidance=shift, noise=xi, logprob_mean="guided")
    torch.testing.assert_close(un.x_next, gu.x_next)
    ref_un = torch.distributions.Normal(un.mean_unguided, std).log_prob(un.x_next).mean(1)
    ref_gu = torch.distributions.Normal(un.mean_guided, std).log_prob(un.x_next).mean(1)
    torch.testing.assert_close(un.log_prob, ref_un)
    torch.testing.assert_close(gu.log_prob, ref_gu)


# --------------------------------------------------------------------------------- batching and dtypes
def test_per_sample_sigma_matches_rowwise_scalars() -> None:
    g = _gen(10)
    x, v, xi = (torch.randn(3, 2, 2, generator=g) for _ in range(3))
    sig, nxt = torch.tensor([1.0, 0.6, 0.25]), torch.tensor([0.98, 0.5, 0.0])
    for kind in ("dance", "flow", "ode"):
        out = sde_step(x, v, sig, nxt, noise_type=kind, sigma_1=0.98, noise=xi)  # type: ignore[arg-type]
        for b in range(3):
            row = sde_step(x[b : b + 1], v[b : b + 1], float(sig[b]), float(nxt[b]),
                           noise_type=kind, sigma_1=0.98, noise=xi[b : b + 1])  # type: ignore[arg-type]
            torch.testing.assert_close(out.x_next[b : b + 1], row.x_next)
            torch.testing.assert_close(out.log_prob[b : b + 1], row.log_prob)
    assert expand_per_sample(sig, x).shape == (3, 1, 1)
    with pytest.raises(ValueError):
        expand_per_sample(torch.ones(2), x)


def test_bf16_inputs_give_fp32_equal_to_upcast() -> None:
    g = _gen(11)
    x, v, xi, grad = (torch.randn(2, 3, 4, generator=g).bfloat16() for _ in range(4))
    sig = torch.tensor([0.6, 0.3]).bfloat16()
    up = [t.float() for t in (x, v, xi, grad, sig)]
    for kind in ("dance", "flow", "ode"):
        a = sde_step(x, v, sig, 0.2, noise_type=kind, noise=xi, guidance=grad)  # type: ignore[arg-type]
        b = sde_step(up[0], up[1], up[4], 0.2, noise_type=kind, noise=up[2], guidance=up[3])  # type: ignore[arg-type]
        for name in ("x_next", "mean_unguided", "mean_guided", "std", "log_prob"):
            assert getattr(a, name).dtype == torch.float32, name
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    s = guidance_shift(grad, 0.5, sig, True, True)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, guidance_shift(up[3], 0.5, up[4], True, True), rtol=0, atol=0)
    lp = transition_log_prob(x, v, sig)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, transition_log_prob(up[0], up[1], up[4]), rtol=0, atol=0)
    assert predicted_x0(x, v, sig).dtype == torch.float32
