"""Rollout sampler and trajectory record: checked against a direct transcription of DESIGN.md section 3.

The policy is the real diffusers ``HunyuanVideoTransformer3DModel`` at a tiny random config; the PRM is an
analytic reward whose gradient is known in closed form, so every guided mean can be recomputed by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from euphonium_ray.config import RunConfig
from euphonium_ray.models.base import TextConditioning
from euphonium_ray.sampling import (
    ProcessRewardError,
    make_generators,
    sample_latents,
    sample_seed,
    sample_trajectories,
)
from euphonium_ray.models.hunyuan import HunyuanVideoPolicy
from euphonium_ray.trajectory import TrajectoryError, Trajectories

# ------------------------------------------------------------------------------ tiny world (shared helpers)
LATENT_SHAPE = (4, 2, 4, 4)  # (C, T, h, w)
TEXT_LEN, TEXT_DIM, POOLED_DIM = 6, 16, 8


def tiny_transformer(seed: int = 0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=LATENT_SHAPE[0], out_channels=LATENT_SHAPE[0], num_attention_heads=2, attention_head_dim=8,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1,
        text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, rope_axes_dim=(2, 2, 4),
    )


def tiny_policy(seed: int = 0) -> HunyuanVideoPolicy:
    """The real policy adapter over a tiny random transformer (no codec needed for latent-space tests)."""
    return HunyuanVideoPolicy(tiny_transformer(seed), None)


def make_cond(num_prompts: int, group_size: int, seed: int = 0) -> TextConditioning:
    """Distinct random prompt embeddings, each repeated for its group (contiguous)."""
    g = torch.Generator().manual_seed(seed)
    cond = TextConditioning(torch.randn(num_prompts, TEXT_LEN, TEXT_DIM, generator=g),
                            torch.ones(num_prompts, TEXT_LEN, dtype=torch.long),
                            torch.randn(num_prompts, POOLED_DIM, generator=g))
    return cond.repeat_interleave(group_size)


class QuadraticPRM:
    """r(x) = −mean((x − target)²) per sample: its gradient −2(x − target)/D is known in closed form."""

    def __init__(self, seed: int = 1) -> None:
        self.target = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(seed))

    def reward(self, x):
        return -((x - self.target) ** 2).flatten(1).mean(1)

    def grad(self, x):
        return -2 * (x - self.target) / self.target.numel()

    def score(self, x, sigma, cond):
        return self.reward(x)

    def score_and_grad(self, x, sigma, cond):
        return self.reward(x), self.grad(x)


@pytest.fixture(scope="module")
def policy():
    return tiny_policy(seed=0)


def _cfg(**sets: object) -> RunConfig:
    cfg = RunConfig()
    for key, value in sets.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def _schedule(n: int, shift: float) -> list[float]:
    """σ_i = s·τ/(1+(s−1)·τ), τ = linspace(1, 0, N+1), written out in python floats."""
    taus = [1 - i / n for i in range(n + 1)]
    return [shift * t / (1 + (shift - 1) * t) for t in taus]


def _reference_rollout(policy, cond, seeds, group_size, cfg: RunConfig, prm=None):
    """Independent transcription of the guided DanceGRPO SDE with per-sample noise streams."""
    n, eta = cfg.sampler.num_steps, cfg.sampler.eta
    sig = _schedule(n, cfg.sampler.shift)
    gens = make_generators(seeds)
    b = len(cond)
    draws = [torch.randn(LATENT_SHAPE, generator=g) for g in gens]  # every stream draws x_0 once
    x = torch.stack([draws[(r // group_size) * group_size] for r in range(b)])  # members share the leader's
    c = cfg.rgg.scale
    path, logps, guided = [x], [], {}
    for i in range(n):
        s, s2 = sig[i], sig[i + 1]
        dt = s - s2
        v = policy.velocity(x, torch.full((b,), s), cond).detach()
        mu = x - dt * v - 0.5 * eta**2 * dt * (x + (1 - s) * v) / s
        mu_g = mu
        if prm is not None and cfg.rgg.start <= i:
            mu_g = mu + c * dt * prm.grad(x)
            guided[i] = mu_g
        std = eta * math.sqrt(dt)
        xi = torch.stack([torch.randn(LATENT_SHAPE, generator=g) for g in gens])
        x = mu_g + std * xi
        logps.append(torch.distributions.Normal(mu, std).log_prob(x).flatten(1).mean(1))
        path.append(x)
    return torch.stack(path, 1), torch.stack(logps, 1), guided


def test_unguided_rollout_matches_hand_written_dance_sde_and_normal_log_prob(policy):
    cfg = _cfg(rgg__enabled=False)
    cond = make_cond(num_prompts=2, group_size=2)
    seeds = [sample_seed(1, 0, p, m) for p in range(2) for m in range(2)]
    traj = sample_trajectories(policy, cond, sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa, prm=None,
                               latent_shape=LATENT_SHAPE, group_size=2, generator=make_generators(seeds))
    ref_path, ref_logp, _ = _reference_rollout(policy, cond, seeds, 2, cfg)
    torch.testing.assert_close(traj.latents, ref_path, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(traj.log_probs, ref_logp, atol=1e-5, rtol=1e-5)
    assert traj.guided_steps.numel() == 0 and not traj.process_evaluated.any()


def test_rgg_rollout_shifts_the_mean_by_c_dt_prm_gradient_at_the_input_latent(policy):
    cfg = _cfg()
    prm = QuadraticPRM()
    cond = make_cond(num_prompts=2, group_size=2)
    seeds = [11, 12, 13, 14]
    traj = sample_trajectories(policy, cond, sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa, prm=prm,
                               latent_shape=LATENT_SHAPE, group_size=2, generator=make_generators(seeds))
    ref_path, ref_logp, ref_guided = _reference_rollout(policy, cond, seeds, 2, cfg, prm=prm)
    torch.testing.assert_close(traj.latents, ref_path, atol=1e-5, rtol=1e-5)
    # the old log-prob is taken under the UNGUIDED mean (upstream default), on guided samples
    torch.testing.assert_close(traj.log_probs, ref_logp, atol=1e-5, rtol=1e-5)
    assert traj.guided_steps.tolist() == [12, 13, 14, 15]
    for j, step in enumerate(traj.guided_steps.tolist()):
        torch.testing.assert_close(traj.guided_means[:, j], ref_guided[step], atol=1e-5, rtol=1e-5)
    # process rewards: the PRM score of x_k at guided steps only
    expect = torch.stack([prm.reward(ref_path[:, k]) for k in range(12, 16)], 1)
    torch.testing.assert_close(traj.process_rewards[:, 12:], expect, atol=1e-6, rtol=1e-5)
    assert traj.process_evaluated[:, 12:].all() and not traj.process_evaluated[:, :12].any()
    assert (traj.process_rewards[:, :12] == 0).all()
    torch.testing.assert_close(traj.guidance_norms[:, 12], prm.grad(ref_path[:, 12]).flatten(1).norm(dim=1))


def test_guided_logprob_option_uses_the_guided_mean(policy):
    cfg = _cfg()
    cond = make_cond(num_prompts=1, group_size=2)
    traj = sample_trajectories(policy, cond, sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa, prm=QuadraticPRM(),
                               latent_shape=LATENT_SHAPE, group_size=2, generator=make_generators([5, 6]),
                               logprob_mean="guided")
    std = cfg.sampler.eta * math.sqrt(float(traj.sigmas[14] - traj.sigmas[15]))
    expect = torch.distributions.Normal(traj.guided_means[:, 2], std).log_prob(traj.latents[:, 15]).flatten(1).mean(1)
    torch.testing.assert_close(traj.log_probs[:, 14], expect, atol=1e-5, rtol=1e-5)


def test_batched_groups_give_the_same_trajectories_as_one_sample_at_a_time(policy):
    cfg = _cfg()
    cond = make_cond(num_prompts=2, group_size=2)
    seeds = [21, 22, 23, 24]
    kw = dict(sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa, prm=QuadraticPRM(), latent_shape=LATENT_SHAPE)
    batched = sample_trajectories(policy, cond, group_size=2, generator=make_generators(seeds), **kw)
    for r in range(4):
        leader = (r // 2) * 2
        x0 = torch.randn(1, *LATENT_SHAPE, generator=make_generators([seeds[leader]])[0])  # the group's x_0
        gen = make_generators([seeds[r]])[0]
        torch.randn(LATENT_SHAPE, generator=gen)  # this sample's stream past its own x_0 draw
        alone = sample_trajectories(policy, cond.index([r]), group_size=1, generator=[gen], initial_noise=x0, **kw)
        torch.testing.assert_close(alone.latents[0, 1:], batched.latents[r, 1:], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(alone.log_probs[0], batched.log_probs[r], atol=2e-5, rtol=1e-4)


def test_same_seeds_reproduce_and_group_members_share_initial_noise(policy):
    cfg = _cfg(sampler__num_steps=4, rgg__start=2)
    cond = make_cond(num_prompts=2, group_size=3)
    seeds = [sample_seed(7, 3, p, m) for p in range(2) for m in range(3)]
    kw = dict(sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa, prm=QuadraticPRM(), latent_shape=LATENT_SHAPE,
              group_size=3)
    a = sample_trajectories(policy, cond, generator=make_generators(seeds), **kw)
    b = sample_trajectories(policy, cond, generator=make_generators(seeds), **kw)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    x0 = a.latents[:, 0]
    assert torch.equal(x0[0], x0[1]) and torch.equal(x0[0], x0[2]) and not torch.equal(x0[0], x0[3])
    assert not torch.equal(a.latents[0, -1], a.latents[1, -1])  # members diverge through the SDE noise
    c = sample_trajectories(policy, cond, generator=make_generators([s + 1 for s in seeds]), **kw)
    assert not torch.equal(a.latents, c.latents)
    assert sample_seed(7, 3, 0, 1) != sample_seed(7, 3, 1, 0) != sample_seed(7, 4, 1, 0)


def test_prm_exception_raises_naming_the_step(policy):
    cfg = _cfg(sampler__num_steps=4, rgg__start=2)
    cond = make_cond(num_prompts=1, group_size=2)

    def broken(x, s, c):
        raise RuntimeError("PRM out of memory")

    with pytest.raises(ProcessRewardError, match=r"step 2 .*PRM out of memory"):
        sample_trajectories(policy, cond, sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa, prm=broken,
                            latent_shape=LATENT_SHAPE, group_size=2, generator=make_generators([1, 2]))


def test_non_finite_prm_gradient_gives_no_shift_and_a_nan_process_reward_for_that_sample(policy):
    cfg = _cfg(sampler__num_steps=4, rgg__start=2)
    cond = make_cond(num_prompts=1, group_size=2)
    prm = QuadraticPRM()

    def half_broken(x, s, c):
        score, grad = prm.score_and_grad(x, s, c)
        grad = grad.clone()
        grad[1] = float("nan")
        return score, grad

    traj = sample_trajectories(policy, cond, sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa, prm=half_broken,
                               latent_shape=LATENT_SHAPE, group_size=2, generator=make_generators([1, 2]))
    assert torch.isfinite(traj.latents).all()
    assert torch.isnan(traj.process_rewards[1, 2:]).all() and torch.isfinite(traj.process_rewards[0, 2:]).all()
    assert (traj.guidance_shifts[1] == 0).all() and (traj.guidance_shifts[0] != 0).any()


def test_spsa_shift_points_along_a_linear_outcome_reward(policy):
    cfg = _cfg(sampler__num_steps=4, rgg__enabled=False, spsa__enabled=True, spsa__start=3, spsa__num_samples=256,
               spsa__scale=1.0)
    cond = make_cond(num_prompts=1, group_size=2)
    direction = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(3))
    seen_rows: list[torch.Tensor] = []

    def linear_orm(points: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        seen_rows.append(rows)
        return (points * direction).flatten(1).sum(1) * (1 + rows.float())  # sample 1's reward is twice as steep

    traj = sample_trajectories(policy, cond, sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa, prm=None,
                               spsa_score_fn=linear_orm, latent_shape=LATENT_SHAPE, group_size=2,
                               generator=make_generators([1, 2]))
    assert traj.guided_steps.tolist() == [3]
    dt = float(traj.sigmas[3] - traj.sigmas[4])
    for r in range(2):
        g_hat = traj.guidance_shifts[r, 0] / dt / (1 + r)
        cos = torch.nn.functional.cosine_similarity(g_hat.flatten(), direction.flatten(), dim=0)
        assert cos > 0.6, float(cos)
    assert seen_rows[0].tolist() == [0, 1] * 512


def test_ode_sample_latents_is_the_euler_integrator(policy):
    cond = make_cond(num_prompts=2, group_size=1)
    x0 = torch.randn(2, *LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    out = sample_latents(policy, cond, latent_shape=LATENT_SHAPE, num_steps=4, shift=3.0, noise_type="ode",
                         initial_noise=x0)
    sig = _schedule(4, 3.0)
    x = x0
    for i in range(4):
        x = x - (sig[i] - sig[i + 1]) * policy.velocity(x, torch.full((2,), sig[i]), cond).detach()
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


def test_trajectories_round_trip_through_a_tensor_dict_and_split_by_groups(policy):
    cfg = _cfg(sampler__num_steps=4, rgg__start=2)
    cond = make_cond(num_prompts=3, group_size=2)
    traj = sample_trajectories(policy, cond, sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa, prm=QuadraticPRM(),
                               latent_shape=LATENT_SHAPE, group_size=2, generator=make_generators(range(6)),
                               prompt_indices=[4, 4, 9, 9, 2, 2], captions=list("aabbcc"), weight_version=3)
    d = traj.to_dict()
    assert all(isinstance(v, (torch.Tensor, list, int)) for v in d.values())
    back = Trajectories.from_dict(d)
    for name, value in d.items():
        other = back.to_dict()[name]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    parts = traj.split_groups(2)
    assert [p.batch_size for p in parts] == [4, 2] and parts[1].captions == ["c", "c"]
    assert parts[1].prompt_indices.tolist() == [2, 2]
    joined = Trajectories.cat(parts)
    assert torch.equal(joined.latents, traj.latents) and torch.equal(joined.guided_means, traj.guided_means)
    assert torch.equal(joined.cond.prompt_embeds, traj.cond.prompt_embeds) and joined.weight_version == 3


def test_trajectories_without_one_optional_field_round_trip_with_that_field_none(policy):
    """What a rollout worker sends when the learner reads the guided means but not the guidance shifts (the toy
    demo's distillation without a guided-mean log-prob) comes back whole, the dropped field None."""
    cfg = _cfg(sampler__num_steps=4, rgg__start=2)
    cond = make_cond(num_prompts=2, group_size=2)
    traj = sample_trajectories(policy, cond, sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa, prm=QuadraticPRM(),
                               latent_shape=LATENT_SHAPE, group_size=2, generator=make_generators(range(4)))
    for dropped, kept in (("guidance_shifts", "guided_means"), ("guided_means", "guidance_shifts")):
        back = Trajectories.from_dict(traj.without(dropped).to_dict())
        assert getattr(back, dropped) is None
        assert torch.equal(getattr(back, kept), getattr(traj, kept)) and torch.equal(back.latents, traj.latents)


def test_trajectories_reject_a_field_with_the_wrong_shape(policy):
    cfg = _cfg(sampler__num_steps=2, rgg__enabled=False, rgg__start=0)
    cond = make_cond(num_prompts=1, group_size=2)
    traj = sample_trajectories(policy, cond, sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa, prm=None,
                               latent_shape=LATENT_SHAPE, group_size=2, generator=make_generators([1, 2]))
    d = traj.to_dict()
    d["log_probs"] = d["log_probs"][:, :1]
    with pytest.raises(TrajectoryError, match="log_probs"):
        Trajectories.from_dict(d)
    with pytest.raises(ValueError, match="groups of 3"):
        sample_trajectories(policy, cond, sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa, prm=None,
                            latent_shape=LATENT_SHAPE, group_size=3)
    with pytest.raises(ValueError, match="rgg.enabled"):
        sample_trajectories(policy, cond, sampler=cfg.sampler, rgg=cfg.rgg.model_copy(update={"enabled": True}),
                            spsa=cfg.spsa, prm=None, latent_shape=LATENT_SHAPE, group_size=2)
