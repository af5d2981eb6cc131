"""The method options of issue 13, each against an independent computation.

Process credit at the transition's output (and why the input form carries no signal), guidance on part of a group,
the target-ratio guidance rule, the toy world's oracle process reward, LoRA adapters drawn from the run's seed, and
an ensemble of runs that trains each member exactly as a run alone.
"""

from __future__ import annotations

import math

import pytest
import torch

from euphonium_ray.config import RunConfig, ToyConfig
from euphonium_ray.grpo import group_normalize, process_advantages
from euphonium_ray.learning import compute_advantages, grpo_update, process_credit
from euphonium_ray.models.base import TextConditioning
from euphonium_ray.sampling import make_generators, sample_trajectories
from euphonium_ray.sde import sigma_schedule, step_std, target_ratio_shift, transition_log_prob
from euphonium_ray.trajectory import Trajectories

from test_sampling import LATENT_SHAPE, QuadraticPRM, make_cond, tiny_policy, tiny_transformer


def _two_state_trajectories(x0: torch.Tensor, x1: torch.Tensor, r0: torch.Tensor, r1: torch.Tensor,
                            group: int) -> Trajectories:
    b = x0.shape[0]
    cond = TextConditioning(torch.zeros(b, 1, 1), torch.ones(b, 1, dtype=torch.long), torch.zeros(b, 1))
    ones = torch.ones(b, 1, dtype=torch.bool)
    return Trajectories(
        latents=torch.stack([x0, x1], 1), sigmas=torch.tensor([1.0, 0.5]), log_probs=torch.zeros(b, 1),
        process_rewards=r0.reshape(b, 1), process_evaluated=ones, guidance_norms=torch.zeros(b, 1),
        guided_steps=torch.zeros(0, dtype=torch.long), guided_means=torch.zeros(b, 0, *x0.shape[1:]),
        guidance_shifts=torch.zeros(b, 0, *x0.shape[1:]), x0_hat_final=x1, group_ids=torch.arange(b) // group,
        prompt_indices=torch.arange(b) // group, sample_seeds=torch.zeros(b, dtype=torch.long), cond=cond,
        group_size=group, process_rewards_next=r1.reshape(b, 1), process_evaluated_next=ones,
    )


def test_process_credit_at_the_output_has_a_policy_gradient_where_the_input_form_has_none():
    """A Gaussian transition x1 = x0 + θ + s·ξ and the reward r(x) = x. On-policy, the expected policy gradient
    E[A·∂θ log π(x1|x0)] of process advantages credited at the INPUT r(x0) is zero (r(x0) is fixed before ξ is
    drawn); credited at the output r(x1), or as the difference r(x1) − r(x0), it is the reward's slope, positive."""
    torch.manual_seed(0)
    groups, g, s, theta = 4000, 4, 0.3, torch.zeros((), requires_grad=True)
    x0 = torch.randn(groups * g, 1)  # members of a group start from different states
    x1 = (x0 + theta + s * torch.randn_like(x0)).detach()
    traj = _two_state_trajectories(x0, x1, x0[:, 0], x1[:, 0], g)
    logp = transition_log_prob(x1, x0 + theta, s)  # (B,)
    per_sample = ((x1 - x0 - theta.detach()) / s**2)[:, 0]  # ∂θ log π of each sample, by hand
    (slope,) = torch.autograd.grad(logp.sum(), theta)
    assert float(slope) == pytest.approx(float(per_sample.sum()), rel=1e-4)
    estimates = {}
    for credit in ("input", "output", "difference"):
        rewards, mask = process_credit(traj, credit)
        adv = process_advantages(rewards, mask, g)[:, 0]
        terms = adv * per_sample
        estimates[credit] = (float(terms.mean()), float(terms.std() / math.sqrt(len(terms))))
    mean, se = estimates["input"]
    assert abs(mean) < 4 * se, estimates
    for credit in ("output", "difference"):
        mean, se = estimates[credit]
        assert mean > 20 * se, estimates  # about (G−1)/G · 1/std(r) (output) and 1/s (difference)


def test_sampler_records_the_output_reward_of_every_windowed_transition():
    cfg = RunConfig()
    cfg.sampler.num_steps, cfg.rgg.start, cfg.rgg.scale = 5, 2, 0.0  # scores only, no shift
    prm = QuadraticPRM()
    traj = sample_trajectories(tiny_policy(0), make_cond(2, 2), sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa,
                               prm=prm, latent_shape=LATENT_SHAPE, group_size=2, generator=make_generators(range(4)),
                               output_rewards=True)
    assert traj.guided_steps.numel() == 0  # a zero scale shifts nothing: the PRM is only scored
    window = [2, 3, 4]
    assert traj.process_evaluated_next[:, window].all() and not traj.process_evaluated_next[:, :2].any()
    for k in window:
        torch.testing.assert_close(traj.process_rewards[:, k], prm.reward(traj.latents[:, k]))
        torch.testing.assert_close(traj.process_rewards_next[:, k], prm.reward(traj.latents[:, k + 1]))
    diff, mask = process_credit(traj, "difference")
    torch.testing.assert_close(diff[:, window], traj.process_rewards_next[:, window] - traj.process_rewards[:, window])
    with pytest.raises(ValueError, match="process_credit='output' needs"):
        no_next = sample_trajectories(tiny_policy(0), make_cond(2, 2), sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa,
                                      prm=prm, latent_shape=LATENT_SHAPE, group_size=2,
                                      generator=make_generators(range(4)))
        process_credit(no_next, "output")


def test_target_ratio_shift_has_the_asked_length_along_the_gradient():
    g = torch.randn(3, *LATENT_SHAPE, dtype=torch.float64)
    g[2] = 0
    std = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    shift = target_ratio_shift(g, 0.25, std)
    d = math.prod(LATENT_SHAPE)
    for i in range(2):
        assert float(shift[i].norm()) == pytest.approx(0.25 * float(std[i]) * math.sqrt(d), rel=1e-12)
        cos = float((shift[i] * g[i]).sum() / (shift[i].norm() * g[i].norm()))
        assert cos == pytest.approx(1.0, abs=1e-12)
    assert float(shift[2].abs().max()) == 0.0


def test_guidance_on_part_of_a_group_shifts_only_its_first_members_by_the_target_ratio():
    cfg = RunConfig()
    cfg.sampler.num_steps, cfg.rgg.start = 4, 0
    cfg.rgg.scale_mode, cfg.rgg.target_ratio, cfg.rgg.guided_fraction = "target_ratio", 0.1, 0.5
    group = 4
    traj = sample_trajectories(tiny_policy(0), make_cond(2, group), sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa,
                               prm=QuadraticPRM(), latent_shape=LATENT_SHAPE, group_size=group,
                               generator=make_generators(range(8)))
    guided = torch.tensor([True, True, False, False] * 2)
    assert torch.equal(traj.guided_rows, guided)
    sig = sigma_schedule(4, cfg.sampler.shift)
    d = math.prod(LATENT_SHAPE)
    for j, k in enumerate(traj.guided_steps.tolist()):
        lengths = traj.guidance_shifts[:, j].flatten(1).norm(dim=1)
        std = float(step_std(float(sig[k]), float(sig[k + 1]), "dance", eta=cfg.sampler.eta))
        torch.testing.assert_close(lengths[guided], torch.full((4,), 0.1 * std * math.sqrt(d)), rtol=1e-5, atol=0)
        assert float(lengths[~guided].max()) == 0.0


def test_a_run_that_scores_output_credit_wants_output_rewards_and_upstream_does_not():
    from euphonium_ray.learning import wants_output_rewards

    cfg = RunConfig()
    assert not wants_output_rewards(cfg)  # upstream: input credit
    cfg.advantage.process_credit = "difference"
    assert wants_output_rewards(cfg)
    cfg.advantage.mode = "none"
    assert not wants_output_rewards(cfg)


# -------------------------------------------------------------------------------------------------- oracle
def test_oracle_process_reward_is_the_task_reward_of_the_one_step_prediction_with_its_gradient():
    """Score = reward(decode(x − σ·v(x))), recomputed by hand; gradient = central finite differences (fp64)."""
    from euphonium_ray.toy.codec import PixelUnshuffleCodec
    from euphonium_ray.toy.oracle import OracleProcessReward
    from euphonium_ray.toy.rewards import CenteredReward

    toy = ToyConfig(size=8, frames=2, latent_factor=2, radius=(0.2, 0.25), speed=(0.05, 0.05))
    codec = PixelUnshuffleCodec(factor=2, shift=-0.9, scale=2.5)
    shape = codec.latent_shape(2, 8, 8)  # (12, 2, 4, 4)
    from diffusers import HunyuanVideoTransformer3DModel

    from euphonium_ray.models.hunyuan import HunyuanVideoPolicy

    torch.manual_seed(0)
    net = HunyuanVideoTransformer3DModel(
        in_channels=shape[0], out_channels=shape[0], num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)).double()
    policy = HunyuanVideoPolicy(net, codec)
    reward = CenteredReward(toy, spread=0.5)
    oracle = OracleProcessReward(policy, codec, reward)
    cond = make_cond(1, 2).with_captions(["a red circle moving left"] * 2)
    cond = TextConditioning(cond.prompt_embeds.double(), cond.attention_mask, cond.pooled.double(), cond.captions)
    x = (0.3 * torch.randn(2, *shape, dtype=torch.float64))
    sigma = torch.tensor([0.6, 0.6], dtype=torch.float64)
    score, grad = oracle.score_and_grad(x, sigma, cond)
    with torch.no_grad():
        v = policy.velocity(x, sigma, cond).double()
        by_hand = reward.score(codec.decode(x - 0.6 * v), list(cond.captions))
    torch.testing.assert_close(score.double(), by_hand, rtol=1e-5, atol=1e-6)
    direction = torch.randn_like(x)
    eps = 1e-4
    plus = oracle.score(x + eps * direction, sigma, cond).double()
    minus = oracle.score(x - eps * direction, sigma, cond).double()
    fd = (plus - minus) / (2 * eps)
    analytic = (grad.double() * direction).flatten(1).sum(1)
    torch.testing.assert_close(analytic, fd, rtol=1e-3, atol=1e-6)
    assert float(grad.abs().max()) > 0
    clean = oracle.score(x, torch.zeros(2, dtype=torch.float64), cond)  # σ = 0: the latent is its own prediction
    torch.testing.assert_close(clean.double(), reward.score(codec.decode(x), list(cond.captions)).double())


# -------------------------------------------------------------------------------------------------- seeding
def test_two_lora_runs_with_one_seed_start_from_identical_adapters_and_another_seed_differs(tmp_path):
    from euphonium_ray.models.hunyuan import HunyuanVideoPolicy

    tiny_transformer(0).save_pretrained(tmp_path / "transformer")

    def adapters(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(1234 + seed)  # the global RNG must not matter
        p = HunyuanVideoPolicy.from_pretrained(tmp_path, trainable="lora", lora_rank=2, lora_alpha=2.0,
                                               lora_seed=seed, with_codec=False)
        return {k: v.clone() for k, v in p.sync_state_dict().items()}

    a, b, c = adapters(7), adapters(7), adapters(8)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k)


# -------------------------------------------------------------------------------------------------- ensemble
def test_an_ensemble_trains_each_member_exactly_as_a_run_alone(tmp_path):
    """Two LoRA runs (seeds 3 and 5) trained alone for two steps, and the same two runs as one PolicyEnsemble:
    the same rollouts (to fp32 rounding) and the same adapters after each AdamW update."""
    from euphonium_ray.ensemble import PolicyEnsemble
    from euphonium_ray.models.hunyuan import HunyuanVideoPolicy
    from euphonium_ray.step import build_optimizer, transition_generator

    tiny_transformer(0).save_pretrained(tmp_path / "transformer")
    cfg = RunConfig()
    cfg.sampler.num_steps, cfg.sampler.group_size, cfg.sampler.same_initial_noise = 4, 2, False
    cfg.rgg.enabled, cfg.advantage.mode, cfg.optim.grad_accum, cfg.optim.lr = False, "none", 4, 1e-3

    def load(seed: int) -> HunyuanVideoPolicy:
        return HunyuanVideoPolicy.from_pretrained(tmp_path, trainable="lora", lora_rank=2, lora_alpha=2.0,
                                                  lora_seed=seed, with_codec=False)

    seeds = [3, 5]
    solos = [load(s) for s in seeds]
    ens = PolicyEnsemble([load(s) for s in seeds])
    opts = [build_optimizer(p.trainable_parameters(), cfg.optim) for p in solos]
    ens_opt = build_optimizer(ens.trainable_parameters(), cfg.optim)
    cond = make_cond(2, 2)
    target = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(9))

    def reward(latents: torch.Tensor) -> torch.Tensor:
        return -((latents - target) ** 2).flatten(1).mean(1)

    def rollout(policy, run_seeds):
        c = TextConditioning.cat([cond] * len(run_seeds))
        row_seeds = [1000 * rs + i for rs in run_seeds for i in range(4)]
        return sample_trajectories(policy, c, sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa, prm=None,
                                   latent_shape=LATENT_SHAPE, group_size=2, generator=make_generators(row_seeds),
                                   same_initial_noise=False)

    for step in range(2):
        solo_trajs = []
        for seed, p, o in zip(seeds, solos, opts):
            traj = rollout(p, [seed])
            adv = compute_advantages(traj, reward(traj.x0_hat_final), None, cfg)
            grpo_update(p, o, traj, adv.terms, cfg, transition_generator(seed, step))
            solo_trajs.append(traj)
        traj = rollout(ens, seeds)
        torch.testing.assert_close(traj.latents, torch.cat([t.latents for t in solo_trajs]), rtol=1e-5, atol=1e-5)
        adv = compute_advantages(traj, reward(traj.x0_hat_final), None, cfg)
        out = grpo_update(ens, ens_opt, traj, adv.terms, cfg, [transition_generator(s, step) for s in seeds])
        assert len(out["members"]) == 2 and all(m["first_ratio_min"] == pytest.approx(1, abs=1e-5)
                                                 for m in out["members"])
        for m, p in enumerate(solos):
            solo_params = dict(p.transformer.named_parameters())
            for name, value in ens.member_state(m).items():
                torch.testing.assert_close(value, solo_params[name].detach(), rtol=1e-4, atol=1e-5)


def test_an_ensemble_refuses_members_that_do_not_share_a_base(tmp_path):
    from euphonium_ray.ensemble import PolicyEnsemble

    with pytest.raises(ValueError, match="frozen tensor"):
        PolicyEnsemble([_lora(tiny_transformer(0)), _lora(tiny_transformer(1))])
    with pytest.raises(ValueError, match="equal blocks"):
        ens = PolicyEnsemble([_lora(tiny_transformer(0)), _lora(tiny_transformer(0))])
        ens.velocity(torch.zeros(3, *LATENT_SHAPE), 0.5, make_cond(3, 1))


def _lora(net):
    from euphonium_ray.models.hunyuan import HunyuanVideoPolicy, add_lora

    add_lora(net, rank=2, alpha=2.0, seed=0)
    return HunyuanVideoPolicy(net, None)


def test_group_normalised_process_advantages_are_zero_for_a_step_with_no_spread():
    r = torch.tensor([[1.0, 2.0], [1.0, 3.0]])
    adv = process_advantages(r, torch.ones(2, 2, dtype=torch.bool), 2)
    assert torch.equal(adv[:, 0], torch.zeros(2))
    torch.testing.assert_close(adv[:, 1], group_normalize(r[:, 1], 2))
