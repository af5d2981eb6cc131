"""Tests of euphonium_ray.grpo against independent computations (formulas written out here, torch.distributions,
finite differences, hand-computed numbers)."""

from __future__ import annotations

import pytest
import torch

from euphonium_ray.grpo import (
    AdvantageWeights,
    advantage_terms,
    clipped_policy_loss,
    distillation_loss,
    dual_reward_policy_loss,
    gather_steps,
    gaussian_kl,
    group_normalize,
    kl_to_reference,
    parse_advantage_mode,
    process_advantages,
    select_timesteps,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -------------------------------------------------------------------------------------------- advantages
def test_group_normalize_zero_mean_unit_unbiased_std_per_group() -> None:
    r = torch.randn(12, generator=_gen(0)) * 3 + 1
    a = group_normalize(r, 4)
    for grp in range(3):
        block = r[4 * grp : 4 * grp + 4]
        expected = (block - block.mean()) / (block.std(unbiased=True) + 1e-8)
        torch.testing.assert_close(a[4 * grp : 4 * grp + 4], expected)
        assert abs(float(a[4 * grp : 4 * grp + 4].mean())) < 1e-6
        assert float(a[4 * grp : 4 * grp + 4].std(unbiased=True)) == pytest.approx(1.0, abs=1e-6)


def test_group_normalize_two_dims_normalises_each_column() -> None:
    r = torch.randn(6, 5, generator=_gen(1))
    a = group_normalize(r, 3)
    for k in range(5):
        torch.testing.assert_close(a[:, k], group_normalize(r[:, k], 3))


def test_identical_rewards_give_exact_zeros_and_no_nan() -> None:
    r = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.7, 0.2])
    a = group_normalize(r, 3)
    assert torch.equal(a[:3], torch.zeros(3))
    assert torch.isfinite(a).all() and a[3:].abs().sum() > 0
    assert torch.equal(group_normalize(torch.randn(4), 1), torch.zeros(4))  # a group of one: nothing to compare


def test_non_finite_reward_raises_naming_the_index() -> None:
    r = torch.arange(8, dtype=torch.float32)
    r[5] = float("nan")
    with pytest.raises(ValueError, match="index 5"):
        group_normalize(r, 4)
    r2 = torch.zeros(4, 3)
    r2[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"index \(2, 1\)"):
        group_normalize(r2, 2)
    with pytest.raises(ValueError, match="multiple"):
        group_normalize(torch.zeros(5), 2)


def test_process_advantages_zero_where_not_evaluated() -> None:
    r = torch.randn(4, 5, generator=_gen(2))
    r[:, 0] = float("nan")  # never evaluated: ignored, even if garbage
    steps = torch.tensor([False, True, True, False, True])
    a = process_advantages(r, steps, 2)
    assert torch.equal(a[:, ~steps], torch.zeros(4, 2))
    torch.testing.assert_close(a[:, steps], group_normalize(r[:, steps], 2))
    # (B, K) mask: a member the PRM failed on is left out of its group's statistics.
    r3 = torch.tensor([[1.0], [2.0], [4.0], [9.0]])
    mask = torch.tensor([[True], [True], [True], [False]])
    a3 = process_advantages(r3, mask, 4)
    torch.testing.assert_close(a3[:3, 0], group_normalize(torch.tensor([1.0, 2.0, 4.0]), 3))
    assert a3[3, 0] == 0


def test_parse_advantage_mode_aliases() -> None:
    assert [parse_advantage_mode(v) for v in ("0", "1", "2")] == ["none", "only", "both"]
    assert parse_advantage_mode("BOTH") == "both"
    with pytest.raises(ValueError):
        parse_advantage_mode("3")


A_O = torch.tensor([1.0, -1.0])
A_P = torch.tensor([[0.5, 2.0], [-0.5, -2.0]])
A_LO = torch.tensor([0.3, -0.3])
W = AdvantageWeights(outcome=2.0, process=1.0, latent_outcome=1.0)


def test_advantage_terms_paper_rule_each_mode() -> None:
    both = advantage_terms(A_O, A_P, A_LO, mode="both", combine="paper", weights=W)
    assert len(both) == 1 and both[0][0] == 1.0
    torch.testing.assert_close(both[0][1], torch.tensor([[2.8, 4.3], [-2.8, -4.3]]))
    none = advantage_terms(A_O, A_P, A_LO, mode="none", combine="paper", weights=W)
    torch.testing.assert_close(none[0][1], torch.tensor([[2.3, 2.3], [-2.3, -2.3]]))
    only = advantage_terms(A_O, A_P, A_LO, mode="only", combine="paper", weights=W)
    torch.testing.assert_close(only[0][1], A_P)


def test_advantage_terms_upstream_rule_each_mode() -> None:
    both = advantage_terms(A_O, A_P, A_LO, mode="both", combine="upstream", weights=W)
    assert [w for w, _ in both] == [2.0, 1.0, 1.0]
    torch.testing.assert_close(both[0][1], torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
    torch.testing.assert_close(both[1][1], torch.tensor([[0.3, 0.3], [-0.3, -0.3]]))
    torch.testing.assert_close(both[2][1], A_P)
    none = advantage_terms(A_O, A_P, A_LO, mode="none", combine="upstream", weights=W)
    assert [w for w, _ in none] == [2.0, 1.0]
    only = advantage_terms(A_O, A_P, None, mode="1", combine="upstream", weights=W)  # type: ignore[arg-type]
    assert len(only) == 1 and only[0][0] == 1.0
    # default weights drop the zero-weight latent-outcome term
    assert len(advantage_terms(A_O, A_P, A_LO, mode="both", combine="upstream")) == 2


def test_only_mode_without_process_falls_back_to_outcome_with_warning() -> None:
    with pytest.warns(UserWarning, match="falling back"):
        terms = advantage_terms(A_O, None, None, mode="only", combine="paper", num_transitions=3)
    torch.testing.assert_close(terms[0][1], A_O.view(2, 1).expand(2, 3))


def test_clamp_is_applied_after_combining_for_paper_and_per_term_for_upstream() -> None:
    a_o, a_p = torch.tensor([4.0]), torch.tensor([[3.0, -1.0]])
    paper = advantage_terms(a_o, a_p, None, mode="both", combine="paper")
    torch.testing.assert_close(paper[0][1], torch.tensor([[5.0, 3.0]]))
    up = advantage_terms(torch.tensor([7.0]), torch.tensor([[-9.0, 1.0]]), None, mode="both", combine="upstream")
    torch.testing.assert_close(up[0][1], torch.tensor([[5.0, 5.0]]))
    torch.testing.assert_close(up[1][1], torch.tensor([[-5.0, 1.0]]))
    small = advantage_terms(a_o, a_p, None, mode="both", combine="paper", clamp=2.0)
    assert float(small[0][1].abs().max()) == 2.0


def test_paper_and_upstream_differ_outside_the_clip_and_agree_inside() -> None:
    # Two transitions, A_o = +1 and A_p = −2 on both; ratios 1.5 (outside ε=0.2) and 1.1 (inside).
    a_o, a_p = torch.tensor([1.0, 1.0]), torch.tensor([[-2.0], [-2.0]])
    logp_new = torch.log(torch.tensor([[1.5], [1.1]]))
    logp_old = torch.zeros(2, 1)
    paper = advantage_terms(a_o, a_p, None, mode="both", combine="paper")
    upstream = advantage_terms(a_o, a_p, None, mode="both", combine="upstream")
    lp, _ = dual_reward_policy_loss(logp_new, logp_old, paper, 0.2)
    lu, _ = dual_reward_policy_loss(logp_new, logp_old, upstream, 0.2)
    # By hand. Paper: A=−1 → max(1.5, 1.2)=1.5 and 1.1 → mean 1.3.
    # Upstream: outcome max(−1.5, −1.2)=−1.2 and −1.1 → −1.15; process max(3.0, 2.4)=3.0 and 2.2 → 2.6. Sum 1.45.
    assert float(lp) == pytest.approx(1.3)
    assert float(lu) == pytest.approx(1.45)
    inside_p, _ = dual_reward_policy_loss(logp_new[1:], logp_old[1:], [(w, a[1:]) for w, a in paper], 0.2)
    inside_u, _ = dual_reward_policy_loss(logp_new[1:], logp_old[1:], [(w, a[1:]) for w, a in upstream], 0.2)
    assert float(inside_p) == pytest.approx(float(inside_u)) == pytest.approx(1.1)


# ------------------------------------------------------------------------------------ timestep selection
def test_select_timesteps_fraction_mode() -> None:
    idx = select_timesteps(5, 15, fraction=0.6, generator=_gen(3))
    assert idx.shape == (5, 9) and idx.dtype == torch.long
    for row in idx:
        assert len(set(row.tolist())) == 9 and 0 <= int(row.min()) and int(row.max()) < 15
    assert len({tuple(r.tolist()) for r in idx}) > 1  # each sample gets its own permutation
    assert select_timesteps(2, 15, fraction=0.01).shape == (2, 1)


def test_select_timesteps_range_mode() -> None:
    idx = select_timesteps(4, 15, mode="range", start=2, end=10, interval=2, generator=_gen(4))
    assert idx.shape == (4, 5)
    for row in idx:
        assert sorted(row.tolist()) == [2, 4, 6, 8, 10]
    assert sorted(select_timesteps(1, 15, mode="range", start=12)[0].tolist()) == [12, 13, 14]
    with pytest.raises(ValueError):
        select_timesteps(1, 15, mode="range", start=3, end=20)


@pytest.mark.parametrize("mode", ["fraction", "range"])
def test_gathering_latents_and_sigmas_with_the_same_indices_is_consistent(mode: str) -> None:
    # Latent of sample b at step k encodes (b, k) and σ_k; after selection every gathered latent must sit
    # next to its own σ and old log-prob. Upstream's range mode permuted σ but not the latents.
    b, k = 3, 15
    sigmas = torch.linspace(1.0, 0.1, k)
    latents = torch.zeros(b, k, 2, 2)
    for i in range(b):
        for j in range(k):
            latents[i, j] = 100 * i + sigmas[j]
    logp_old = torch.arange(b * k, dtype=torch.float32).view(b, k)
    idx = select_timesteps(b, k, mode=mode, start=3, generator=_gen(5))  # type: ignore[arg-type]
    lat, sig, lp = gather_steps(latents, idx), gather_steps(sigmas.expand(b, k), idx), gather_steps(logp_old, idx)
    for i in range(b):
        for j in range(idx.shape[1]):
            assert torch.all(lat[i, j] == 100 * i + sig[i, j])
            assert lp[i, j] == i * k + idx[i, j]
    # The upstream bug, shown: σ gathered by the permutation but latents taken in order do not match.
    wrong = latents[:, 3 : 3 + idx.shape[1]] if mode == "range" else latents[:, : idx.shape[1]]
    assert not torch.all(wrong[..., 0, 0] == 100 * torch.arange(b).view(b, 1) + sig)


# ----------------------------------------------------------------------------------------------- losses
def _loss_by_hand(lp_new: torch.Tensor, lp_old: torch.Tensor, adv: torch.Tensor, eps: float) -> torch.Tensor:
    ratio = torch.exp(lp_new - lp_old)
    return torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps, 1 + eps)).mean()


def test_clipped_loss_gradient_matches_finite_differences_inside_and_outside_clip() -> None:
    eps = 0.2
    ratios = torch.tensor([[0.5, 0.9, 1.05, 1.5], [0.5, 0.9, 1.05, 1.5]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-2.0, -2.0, -2.0, -2.0]], dtype=torch.float64)
    lp_old = torch.randn(2, 4, generator=_gen(6), dtype=torch.float64)
    lp_new = (lp_old + ratios.log()).requires_grad_(True)
    loss, _ = clipped_policy_loss(lp_new, lp_old, adv, eps)
    torch.testing.assert_close(loss, _loss_by_hand(lp_new, lp_old, adv, eps))
    (grad,) = torch.autograd.grad(loss, lp_new)
    h = 1e-6
    fd = torch.zeros_like(grad)
    for idx in torch.cartesian_prod(torch.arange(2), torch.arange(4)).tolist():
        e = torch.zeros_like(grad)
        e[tuple(idx)] = h
        with torch.no_grad():
            fd[tuple(idx)] = (clipped_policy_loss(lp_new + e, lp_old, adv, eps)[0]
                              - clipped_policy_loss(lp_new - e, lp_old, adv, eps)[0]) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)
    # Closed form: −A·ρ/M where the unclipped branch is active; 0 where the clip holds the objective.
    active = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.float64)
    torch.testing.assert_close(grad, -adv * ratios * active / 8)


def test_ratio_one_gives_minus_mean_advantage() -> None:
    adv = torch.randn(4, 3, generator=_gen(7))
    lp = torch.randn(4, 3, generator=_gen(8))
    loss, stats = clipped_policy_loss(lp, lp.clone(), adv, 1e-4)
    torch.testing.assert_close(loss, -adv.mean())
    assert stats["clip_fraction"] == 0.0 and stats["ratio_mean"] == 1.0 and stats["approx_kl"] == 0.0


def test_clipped_loss_stats() -> None:
    lp_new = torch.log(torch.tensor([0.5, 1.0, 1.0, 2.0]))
    loss, stats = clipped_policy_loss(lp_new, torch.zeros(4), torch.ones(4), 0.2)
    assert stats["clip_fraction"] == pytest.approx(0.5)
    assert stats["ratio_min"] == pytest.approx(0.5) and stats["ratio_max"] == pytest.approx(2.0)
    assert stats["ratio_mean"] == pytest.approx(1.125)
    assert stats["approx_kl"] == pytest.approx(0.5 * (2 * torch.log(torch.tensor(2.0)) ** 2 / 4).item())


def test_dual_reward_policy_loss_is_weighted_sum_of_clipped_losses() -> None:
    g = _gen(9)
    lp_new, lp_old = torch.randn(4, 3, generator=g) * 0.1, torch.randn(4, 3, generator=g) * 0.1
    a1, a2 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    total, _ = dual_reward_policy_loss(lp_new, lp_old, [(2.0, a1), (0.5, a2)], 0.05)
    expected = 2.0 * _loss_by_hand(lp_new, lp_old, a1, 0.05) + 0.5 * _loss_by_hand(lp_new, lp_old, a2, 0.05)
    torch.testing.assert_close(total, expected)
    lp_req = lp_new.clone().requires_grad_(True)
    empty, _ = dual_reward_policy_loss(lp_req, lp_old, [], 0.05)
    empty.backward()
    assert float(empty.detach()) == 0.0 and torch.equal(lp_req.grad, torch.zeros(4, 3))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gaussian_kl_equals_torch_kl_divergence(reduction: str) -> None:
    g = _gen(10)
    mp, mq = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    std = torch.tensor([0.1, 0.5, 2.0])
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mp, std.view(3, 1, 1)), torch.distributions.Normal(mq, std.view(3, 1, 1))
    )
    ref = ref.mean(dim=(1, 2)) if reduction == "mean" else ref.sum(dim=(1, 2))
    torch.testing.assert_close(gaussian_kl(mp, mq, std, reduction), ref)  # type: ignore[arg-type]


def test_kl_to_reference_does_not_backpropagate_into_the_reference() -> None:
    new, ref = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    kl = kl_to_reference(new, ref, 0.3)
    torch.testing.assert_close(kl, ((new - ref) ** 2 / (2 * 0.09)).mean(1))
    kl.sum().backward()
    assert ref.grad is None and new.grad is not None


def test_distillation_zero_with_zero_gradient_at_the_target() -> None:
    target = torch.randn(3, 4, generator=_gen(11))
    mu = target.clone().requires_grad_(True)
    loss = distillation_loss(mu, target, torch.tensor([0.1, 0.2, 0.3]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(mu.grad, torch.zeros(3, 4))


def test_distillation_gradient_step_moves_toward_the_target() -> None:
    g = _gen(12)
    target = torch.randn(3, 4, generator=g).requires_grad_(True)
    mu = torch.randn(3, 4, generator=g).requires_grad_(True)
    std = torch.tensor([0.1, 0.2, 0.3])
    loss = distillation_loss(mu, target, std)
    torch.testing.assert_close(loss, (((mu - target) ** 2).mean(1) / (2 * std**2)).mean())
    loss.backward()
    assert target.grad is None  # the guided target is a stop-gradient
    before = (mu - target).norm(dim=1)
    after = (mu - 1e-4 * mu.grad - target).norm(dim=1)
    assert torch.all(after < before)
    cos = torch.nn.functional.cosine_similarity(-mu.grad, target - mu, dim=1)
    torch.testing.assert_close(cos, torch.ones(3))


def test_distillation_with_zero_std_falls_back_to_squared_error() -> None:
    mu = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    loss = distillation_loss(mu, target, torch.tensor([0.0, 1.0]), reduction="sum")
    assert float(loss.detach()) == pytest.approx((5.0 + 2.0 / 2.0) / 2)
    loss.backward()
    assert torch.isfinite(mu.grad).all()


def test_bf16_inputs_give_fp32_equal_to_upcast() -> None:
    g = _gen(13)
    r = torch.randn(8, 3, generator=g).bfloat16()
    a = group_normalize(r, 4)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, group_normalize(r.float(), 4), rtol=0, atol=0)
    lp_new, lp_old, adv = (torch.randn(8, 3, generator=g).bfloat16() * 0.1 for _ in range(3))
    loss, _ = clipped_policy_loss(lp_new, lp_old, adv, 0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, clipped_policy_loss(lp_new.float(), lp_old.float(), adv.float(), 0.1)[0],
                               rtol=0, atol=0)
    mp, mq = torch.randn(2, 5, generator=g).bfloat16(), torch.randn(2, 5, generator=g).bfloat16()
    kl = gaussian_kl(mp, mq, 0.3)
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, gaussian_kl(mp.float(), mq.float(), 0.3), rtol=0, atol=0)
    d = distillation_loss(mp, mq, 0.3)
    torch.testing.assert_close(d, distillation_loss(mp.float(), mq.float(), 0.3), rtol=0, atol=0)
    terms = advantage_terms(r[:, 0], r, None, mode="both", combine="paper")
    assert terms[0][1].dtype == torch.float32
