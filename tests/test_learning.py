"""Learner maths wiring: advantages from rewards and the clipped-GRPO update, against hand computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from euphonium_ray.config import RunConfig
from euphonium_ray.grpo import select_timesteps
from euphonium_ray.learning import compute_advantages, grpo_update, trainable_transitions
from euphonium_ray.sampling import make_generators, sample_latents, sample_trajectories

from test_sampling import LATENT_SHAPE, QuadraticPRM, make_cond, tiny_policy


def _cfg(**sets: object) -> RunConfig:
    cfg = RunConfig()
    cfg.sampler.num_steps = 6
    cfg.rgg.start = 3
    for key, value in sets.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def _rollout(policy, cfg: RunConfig, num_prompts: int = 2, group: int = 2, seed: int = 0, prm=None):
    cond = make_cond(num_prompts=num_prompts, group_size=group)
    prm = prm if prm is not None else (QuadraticPRM() if cfg.rgg.enabled else None)
    return sample_trajectories(policy, cond, sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa, prm=prm,
                               latent_shape=LATENT_SHAPE, group_size=group,
                               generator=make_generators(range(seed, seed + num_prompts * group)),
                               logprob_mean=cfg.optim.logprob_mean)


def _adamw(policy, cfg: RunConfig):
    return torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


def _group_norm(r: torch.Tensor, g: int) -> torch.Tensor:
    out = torch.zeros_like(r)
    for s in range(0, r.numel(), g):
        seg = r[s : s + g]
        out[s : s + g] = (seg - seg.mean()) / (seg.std(unbiased=True) + 1e-8)
    return out


def test_first_update_of_on_policy_rollouts_has_ratio_one():
    policy = tiny_policy(seed=1)
    for logprob_mean in ("unguided", "guided"):
        cfg = _cfg(optim__logprob_mean=logprob_mean, optim__logprob_mean_training=logprob_mean, optim__grad_accum=2)
        traj = _rollout(policy, cfg, num_prompts=2, group=2)
        adv = compute_advantages(traj, torch.tensor([0.1, 0.5, 0.2, 0.9]), None, cfg)
        stats = grpo_update(policy, _adamw(policy, cfg), traj, adv.terms, cfg, torch.Generator().manual_seed(0))
        assert abs(stats["first_ratio_min"] - 1) < 1e-5 and abs(stats["first_ratio_max"] - 1) < 1e-5, stats
        assert stats["num_updates"] == 2 and stats["num_transitions"] == 4 * int(5 * 0.6)


def test_update_equals_gradient_of_hand_written_clipped_loss():
    """SGD(lr=1) moves the weights by exactly −∇ of the loss written out from DESIGN.md section 3."""
    cfg = _cfg(optim__grad_accum=4, optim__grad_clip=1e9, optim__clip_range=0.2, rgg__enabled=False)
    base = tiny_policy(seed=2)
    traj = _rollout(base, cfg, num_prompts=2, group=2, seed=10)
    with torch.no_grad():  # make the rollouts off-policy so the ratio is not 1 and clipping matters
        for p in base.transformer.parameters():
            p.add_(0.02 * torch.randn_like(p))
    adv = compute_advantages(traj, torch.tensor([1.0, 0.0, 0.3, 0.7]), None, cfg)
    (w, a), = adv.terms
    ours = copy.deepcopy(base)
    grpo_update(ours, torch.optim.SGD(ours.trainable_parameters(), lr=1.0), traj, adv.terms, cfg,
                torch.Generator().manual_seed(5))

    ref = copy.deepcopy(base)
    chosen = select_timesteps(4, 5, fraction=0.6, generator=torch.Generator().manual_seed(5))
    sig, eta, total = traj.sigmas, cfg.sampler.eta, 0.0
    for j in range(4):
        for k in chosen[j].tolist():
            s, s2 = float(sig[k]), float(sig[k + 1])
            x, xn = traj.latents[j : j + 1, k], traj.latents[j : j + 1, k + 1]
            v = ref.velocity(x, torch.tensor([s]), traj.cond.index([j]))
            mu = x - (s - s2) * v - 0.5 * eta**2 * (s - s2) * (x + (1 - s) * v) / s
            logp = torch.distributions.Normal(mu, eta * math.sqrt(s - s2)).log_prob(xn).mean()
            ratio = torch.exp(logp - traj.log_probs[j, k])
            adv_jk = float(a[j, k]) * w
            per = torch.maximum(-adv_jk * ratio, -adv_jk * ratio.clamp(1 - 0.2, 1 + 0.2))
            total = total + per / (4 * chosen.shape[1])
    total.backward()
    for (name, p_ours), p_ref, p_base in zip(ours.transformer.named_parameters(), ref.transformer.parameters(),
                                             base.transformer.parameters()):
        expect = p_base.detach() - (p_ref.grad if p_ref.grad is not None else 0)
        torch.testing.assert_close(p_ours.detach(), expect, atol=1e-6, rtol=1e-4, msg=name)


def test_last_transition_is_untrained_unless_asked():
    seen: list[float] = []
    policy = tiny_policy(seed=3)
    original = policy.velocity

    def recording_velocity(latents, sigma, cond):
        seen.extend(torch.as_tensor(sigma).reshape(-1).tolist())
        return original(latents, sigma, cond)

    for last in (False, True):
        cfg = _cfg(optim__timestep_fraction=1.0, optim__train_last_transition=last, rgg__enabled=False)
        traj = _rollout(policy, cfg, num_prompts=1, group=2)
        adv = compute_advantages(traj, torch.tensor([0.0, 1.0]), None, cfg)
        seen.clear()
        policy.velocity = recording_velocity
        grpo_update(policy, _adamw(policy, cfg), traj, adv.terms, cfg, torch.Generator().manual_seed(0))
        policy.velocity = original
        last_sigma = float(traj.sigmas[-2])
        assert (last_sigma in seen) == last
        assert trainable_transitions(6, cfg) == (6 if last else 5)
        assert len(seen) == 2 * trainable_transitions(6, cfg)


def test_kl_statistic_is_the_gaussian_kl_between_unguided_means():
    cfg = _cfg(optim__kl_coef=0.5, optim__timestep_fraction=1.0, optim__grad_accum=4, rgg__enabled=False)
    reference = tiny_policy(seed=4)
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    traj = _rollout(policy, cfg, num_prompts=1, group=2)
    adv = compute_advantages(traj, torch.tensor([0.0, 1.0]), None, cfg)
    expect = []
    sig, eta = traj.sigmas, cfg.sampler.eta
    with torch.no_grad():
        for j in range(2):
            per_k = []
            for k in range(5):
                s, s2 = float(sig[k]), float(sig[k + 1])
                x = traj.latents[j : j + 1, k]
                means = []
                for pol in (policy, reference):
                    v = pol.velocity(x, torch.tensor([s]), traj.cond.index([j]))
                    means.append(x - (s - s2) * v - 0.5 * eta**2 * (s - s2) * (x + (1 - s) * v) / s)
                per_k.append(float(((means[0] - means[1]) ** 2).mean() / (2 * eta**2 * (s - s2))))
            expect.append(sum(per_k) / 5)
    stats = grpo_update(policy, _adamw(policy, cfg), traj, adv.terms, cfg, torch.Generator().manual_seed(0),
                        reference_policy=reference)
    assert stats["kl"] == pytest.approx(sum(expect) / 2, rel=1e-4)
    with pytest.raises(ValueError, match="reference policy"):
        grpo_update(policy, _adamw(policy, cfg), traj, adv.terms, cfg, None)


def test_distillation_makes_unguided_samples_score_higher_under_the_prm():
    """Distillation alone (no policy-gradient term) moves the guidance into v_θ."""
    cfg = _cfg(rgg__start=0, rgg__scale=40.0, optim__distill_coef=1.0, optim__lr=3e-3, optim__grad_accum=4,
               optim__timestep_fraction=1.0, optim__train_last_transition=True)
    prm = QuadraticPRM(seed=7)
    policy = tiny_policy(seed=5)
    cond = make_cond(num_prompts=2, group_size=2, seed=3)
    noise = torch.randn(4, *LATENT_SHAPE, generator=torch.Generator().manual_seed(99))

    def unguided_score() -> float:
        x = sample_latents(policy, cond, latent_shape=LATENT_SHAPE, num_steps=6, noise_type="dance",
                           initial_noise=noise, generator=make_generators([1, 2, 3, 4]))
        return float(prm.reward(x).mean())

    before = unguided_score()
    opt = _adamw(policy, cfg)
    for it in range(6):
        traj = _rollout(policy, cfg, num_prompts=2, group=2, seed=100 * it, prm=prm)
        stats = grpo_update(policy, opt, traj, [], cfg, torch.Generator().manual_seed(it))
        assert stats["distill_loss"] > 0 and stats["policy_loss"] == 0
    after = unguided_score()
    print(f"unguided PRM score before {before:.4f} after distillation {after:.4f}")
    assert after > before + 0.05 * abs(before)


def test_advantages_match_group_normalised_rewards_and_skip_a_nan_group():
    cfg = _cfg(advantage__process_weight=0.5)
    traj = _rollout(tiny_policy(seed=6), cfg, num_prompts=3, group=2)
    orm = torch.tensor([0.2, 0.8, float("nan"), 0.1, 0.4, 0.3])
    adv = compute_advantages(traj, orm, None, cfg)
    assert adv.kept_rows.tolist() == [0, 1, 4, 5]
    assert adv.skipped_groups == {1: "non-finite ORM reward at sample 2"}
    (w, a), = adv.terms  # paper: one term A = w_o·A_o + w_p·A_p, clamped
    kept = torch.tensor([0, 1, 4, 5])
    a_o = _group_norm(orm[kept], 2)
    a_p = torch.zeros(4, 6)
    for k in range(3, 6):
        a_p[:, k] = _group_norm(traj.process_rewards[kept, k], 2)
    torch.testing.assert_close(a, (a_o[:, None] + 0.5 * a_p).clamp(-5, 5), atol=1e-5, rtol=1e-5)
    assert w == 1.0


def test_upstream_combine_gives_separate_terms_and_latent_outcome_term():
    cfg = _cfg(advantage__combine="upstream", advantage__outcome_weight=2.0, advantage__latent_outcome_weight=1.0)
    traj = _rollout(tiny_policy(seed=6), cfg, num_prompts=1, group=3)
    adv = compute_advantages(traj, torch.tensor([0.1, 0.2, 0.6]), torch.tensor([1.0, -1.0, 0.0]), cfg)
    assert [w for w, _ in adv.terms] == [2.0, 1.0, 1.0]
    torch.testing.assert_close(adv.terms[1][1][:, 0], _group_norm(torch.tensor([1.0, -1.0, 0.0]), 3))
    nan_latent = compute_advantages(traj, torch.tensor([0.1, 0.2, 0.6]), torch.tensor([1.0, float("inf"), 0.0]), cfg)
    assert nan_latent.terms == [] and "latent outcome" in nan_latent.skipped_groups[0]


def test_advantage_terms_of_the_wrong_shape_are_rejected():
    cfg = _cfg(rgg__enabled=False)
    policy = tiny_policy(seed=6)
    traj = _rollout(policy, cfg, num_prompts=1, group=2)
    with pytest.raises(ValueError, match="advantage term"):
        grpo_update(policy, _adamw(policy, cfg), traj, [(1.0, torch.zeros(2, 3))], cfg)
