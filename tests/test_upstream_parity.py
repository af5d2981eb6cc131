"""Upstream parity (issue 18): upstream's launch-script variables give upstream's sampler and objective.

Every expected value here comes from a written-out version of what upstream's code does (zerzerzerz/Euphonium at
d9f2c39; the file:line of each piece is in its docstring), never from this project's own earlier output.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from euphonium_ray.config import ConfigError, RunConfig, load_config
from euphonium_ray.grpo import dual_reward_policy_loss, gaussian_kl, upstream_velocity_kl
from euphonium_ray.learning import compute_advantages, grpo_update
from euphonium_ray.models.hunyuan import HunyuanVideoPolicy
from euphonium_ray.sampling import make_generators, sample_trajectories
from euphonium_ray.sde import network_timestep, sde_step, sigma_schedule, unguided_mean
from euphonium_ray.upstream_env import defaults_table_markdown

from test_sampling import LATENT_SHAPE, QuadraticPRM, make_cond, tiny_policy, tiny_transformer

REPO = Path(__file__).resolve().parents[1]

# scripts/train_grpo_hunyuan.sh lines 57-156: the variables as the launch script sets them
SCRIPT = {
    "TRL_CORE_ENABLED": "true", "SCORE_COEF": "1.0", "TRL_PROMPT_VARIANT": "deformity_physics",
    "LATENT_REWARD_IN_TRL_REWARD_ENABLED": "true", "LATENT_REWARD_IN_TRL_REWARD_COEF": "0.0",
    "LATENT_REWARD_USE_SIGMOID": "false",
    "PROCESS_LATENT_REWARD_ENABLED": "true", "PROCESS_LATENT_REWARD_SAMPLING_ENABLED": "true",
    "PROCESS_LATENT_REWARD_TRAINING_ENABLED": "false", "PROCESS_LATENT_REWARD_GUIDANCE_SCALE": "0.01",
    "PROCESS_LATENT_REWARD_START_STEP": "12", "PROCESS_LATENT_REWARD_END_STEP": "-1",
    "PROCESS_LATENT_REWARD_INTERVAL": "1", "PROCESS_LATENT_REWARD_NORMALIZE_GRADIENT": "false",
    "PROCESS_LATENT_REWARD_KL_BETA": "3.125",
    "PROCESS_REWARD_ADVANTAGE_MODE": "both", "PROCESS_REWARD_ADVANTAGE_COEF": "1.0",
    "OUTCOME_REWARD_ADVANTAGE_COEF": "1.0",
    "USE_KL_LOSS": "false", "KL_COEF": "3.125", "KL_TYPE": "forward", "KL_WEIGHT_VERSION": "v2",
    "SPSA_REWARD_ENABLED": "false", "SPSA_REWARD_SIGMA": "0.01", "SPSA_REWARD_GUIDANCE_SCALE": "0.01",
    "SPSA_REWARD_NORMALIZE_GRADIENT": "false", "SPSA_REWARD_NUM_SAMPLES": "1", "SPSA_REWARD_START_STEP": "12",
    "SPSA_REWARD_END_STEP": "-1", "SPSA_REWARD_INTERVAL": "1", "SPSA_REWARD_KL_BETA": "0.3125",
    "USE_REWARD_GUIDED_MEAN_FOR_LOGPROB": "false", "USE_REWARD_GUIDED_MEAN_FOR_LOGPROB_TRAINING": "false",
    "USE_DELTA_T_FOR_GRADIENT_SCALING": "true", "VIDEO_ALIGN_IN_TRL_REWARD_ENABLED": "false",
}
# a short schedule so that the tiny rollouts are fast: 6 steps, guidance from step 3 (variables upstream too)
SHORT = ["sampler.num_steps=6"]
SHORT_ENV = {"PROCESS_LATENT_REWARD_START_STEP": "3", "SPSA_REWARD_START_STEP": "3"}


def _flag(text: str) -> bool:
    return text.strip().lower() in ("true", "1", "yes", "on")


# ----------------------------------------------------------------------------------- upstream, written out
def upstream_use_process_reward(v: dict[str, str]) -> bool:
    """sampling.py:81-87 with trl_reward_model.py:259-261: RGG needs both process switches and the latent model."""
    return (_flag(v["PROCESS_LATENT_REWARD_ENABLED"]) and _flag(v["PROCESS_LATENT_REWARD_SAMPLING_ENABLED"])
            and _flag(v["LATENT_REWARD_IN_TRL_REWARD_ENABLED"]))


def upstream_should_apply(v: dict[str, str], i: int, total: int) -> bool:
    """grpo_sampling/utils.py:6-37."""
    if not _flag(v["PROCESS_LATENT_REWARD_ENABLED"]):
        return False
    start, end = int(v["PROCESS_LATENT_REWARD_START_STEP"]), int(v["PROCESS_LATENT_REWARD_END_STEP"])
    interval = int(v["PROCESS_LATENT_REWARD_INTERVAL"])
    end = total if end < 0 else end
    return start <= i < end and (i - start) % interval == 0


def upstream_group_advantage(r: torch.Tensor, g: int) -> torch.Tensor:
    """trainer.py:150-160: (r − mean)/(std + 1e-8) with torch's unbiased std, per block of g rows."""
    out = torch.zeros_like(r)
    for s in range(0, r.shape[0], g):
        block = r[s : s + g]
        out[s : s + g] = (block - block.mean(0)) / (block.std(0) + 1e-8)
    return out


def upstream_loss(v: dict[str, str], trl: torch.Tensor, latent: torch.Tensor, process: torch.Tensor | None,
                  ratio: torch.Tensor, g: int) -> torch.Tensor:
    """Upstream's loss per (sample, transition), before its 1/(GA·T) scale: (B, K).

    Rewards: trl_reward_model.py:88-188 ("score" = SCORE_COEF·trl + LATENT_COEF·latent, "trl", "latent_reward"
    when the latent model is on). Weights: trainer.py:138-141 (getattr(args, f"{name}_coef", 1.0): only
    score_coef exists). Terms: trainer.py:413-494 (each clamped to ±5 and PPO-clipped at 1e-4 separately; ORA
    scaled by OUTCOME_REWARD_ADVANTAGE_COEF in mode both only; PRA with PROCESS_REWARD_ADVANTAGE_COEF; mode only
    without process advantages falls back to ORA).
    """
    trl_on, latent_on = _flag(v["TRL_CORE_ENABLED"]), _flag(v["LATENT_REWARD_IN_TRL_REWARD_ENABLED"])
    score_coef, latent_coef = float(v["SCORE_COEF"]), float(v["LATENT_REWARD_IN_TRL_REWARD_COEF"])
    b = trl.shape[0]
    trl_scores = trl if trl_on else torch.zeros(b)
    score = torch.zeros(b)
    if trl_on:
        score = score + trl_scores * score_coef
    if latent_on:
        score = score + latent_coef * latent
    rewards = {"score": score, "trl": trl_scores}
    if latent_on:
        rewards["latent_reward"] = latent
    weights = {name: (score_coef if name == "score" else 1.0) for name in rewards}
    adv = {name: upstream_group_advantage(r, g) for name, r in rewards.items()}
    mode = {"0": "none", "1": "only", "2": "both"}.get(v["PROCESS_REWARD_ADVANTAGE_MODE"],
                                                       v["PROCESS_REWARD_ADVANTAGE_MODE"])
    p_coef, o_coef = float(v["PROCESS_REWARD_ADVANTAGE_COEF"]), float(v["OUTCOME_REWARD_ADVANTAGE_COEF"])
    has_process = mode != "none" and process is not None
    p_adv = upstream_group_advantage(process, g) if has_process else None

    def clipped(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        a = torch.clamp(a, -5.0, 5.0)
        return torch.maximum(-a * r, -a * torch.clamp(r, 1.0 - 1e-4, 1.0 + 1e-4))

    out = torch.zeros(ratio.shape)
    for j in range(ratio.shape[0]):
        for k in range(ratio.shape[1]):
            r, losses = ratio[j, k], []
            if mode in ("none", "both"):
                for name in rewards:
                    w = weights[name] if mode == "none" else o_coef * weights[name]
                    losses.append(w * clipped(adv[name][j], r))
            if mode in ("only", "both") and has_process:
                losses.append(p_coef * clipped(p_adv[j, k], r))
            if mode == "only" and not has_process:
                losses.extend(weights[name] * clipped(adv[name][j], r) for name in rewards)
            out[j, k] = torch.stack(losses).sum()
    return out


# -------------------------------------------------------------------------------------------- helpers
def _cfg(env: dict[str, str], sets: list[str] | None = None, path: str | Path | None = None) -> RunConfig:
    return load_config(path, (sets or []) + SHORT, environ={**SCRIPT, **SHORT_ENV, **env})


def _rollout(cfg: RunConfig, num_prompts: int = 2, group: int = 4, seed: int = 0):
    prm = QuadraticPRM(seed=3)
    cond = make_cond(num_prompts=num_prompts, group_size=group)
    traj = sample_trajectories(tiny_policy(seed=2), cond, sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa, prm=prm,
                               latent_shape=LATENT_SHAPE, group_size=group,
                               generator=make_generators(range(seed, seed + num_prompts * group)),
                               logprob_mean=cfg.optim.logprob_mean)
    return traj, prm


# --------------------------------------------------------------------------------- 1. the RGG switches
@pytest.mark.parametrize("enabled", ["true", "false"])
@pytest.mark.parametrize("sampling", ["true", "false"])
@pytest.mark.parametrize("latent", ["true", "false"])
def test_rgg_guides_only_when_upstreams_three_switches_are_on(enabled: str, sampling: str, latent: str) -> None:
    env = {"PROCESS_LATENT_REWARD_ENABLED": enabled, "PROCESS_LATENT_REWARD_SAMPLING_ENABLED": sampling,
           "LATENT_REWARD_IN_TRL_REWARD_ENABLED": latent}
    v = {**SCRIPT, **SHORT_ENV, **env}
    cfg = _cfg(env)
    assert cfg.rgg.enabled is upstream_use_process_reward(v)
    traj, _ = _rollout(cfg, num_prompts=1, group=2)
    expected = [i for i in range(6) if upstream_use_process_reward(v) and upstream_should_apply(v, i, 6)]
    assert traj.guided_steps.tolist() == expected
    assert traj.process_evaluated.any(0).nonzero().flatten().tolist() == expected


def test_latent_model_switch_alone_can_turn_guidance_off_but_not_on(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    for rgg_on in (True, False):
        base.write_text(f"rgg:\n  enabled: {str(rgg_on).lower()}\n")
        off = load_config(base, environ={"LATENT_REWARD_IN_TRL_REWARD_ENABLED": "false"})
        on = load_config(base, environ={"LATENT_REWARD_IN_TRL_REWARD_ENABLED": "true"})
        assert off.rgg.enabled is False  # upstream: no latent model, is_process_reward_enabled() is false
        assert on.rgg.enabled is rgg_on
    # the main switch set alone: its partners take the script's values (true), as in the launch script
    assert load_config(base, environ={"PROCESS_LATENT_REWARD_ENABLED": "true"}).rgg.enabled is True


def test_guided_training_mean_needs_upstreams_training_switch() -> None:
    """trainer.py:284-290 and grpo_step.py: a guided training mean needs a training-time PRM gradient."""
    for flag in ("true", "false"):
        for training in ("true", "false"):
            env = {"USE_REWARD_GUIDED_MEAN_FOR_LOGPROB_TRAINING": flag,
                   "PROCESS_LATENT_REWARD_TRAINING_ENABLED": training}
            guided = _flag(flag) and _flag(training)
            assert _cfg(env).optim.logprob_mean_training == ("guided" if guided else "unguided")


# ----------------------------------------------------------------- 2-4. the objective upstream trains
OBJECTIVE_CASES = {
    "script defaults: 2 x outcome + latent outcome + process": {},
    "mode none ignores OUTCOME_REWARD_ADVANTAGE_COEF": {"PROCESS_REWARD_ADVANTAGE_MODE": "none",
                                                        "OUTCOME_REWARD_ADVANTAGE_COEF": "3.0"},
    "numeric alias 0 is none": {"PROCESS_REWARD_ADVANTAGE_MODE": "0", "OUTCOME_REWARD_ADVANTAGE_COEF": "3.0",
                                "SCORE_COEF": "2.0"},
    "SCORE_COEF weights the score term": {"SCORE_COEF": "0.5", "OUTCOME_REWARD_ADVANTAGE_COEF": "2.0"},
    "latent mixed into the score: score and trl differ": {"LATENT_REWARD_IN_TRL_REWARD_COEF": "0.7",
                                                           "SCORE_COEF": "1.5"},
    "mode only": {"PROCESS_REWARD_ADVANTAGE_MODE": "only", "PROCESS_REWARD_ADVANTAGE_COEF": "0.5"},
    "mode only without RGG falls back to the outcome terms": {"PROCESS_REWARD_ADVANTAGE_MODE": "1",
                                                               "PROCESS_LATENT_REWARD_ENABLED": "false"},
    "latent model off": {"LATENT_REWARD_IN_TRL_REWARD_ENABLED": "false", "PROCESS_REWARD_ADVANTAGE_COEF": "2.0"},
    "pixel ORM off": {"TRL_CORE_ENABLED": "false", "LATENT_REWARD_IN_TRL_REWARD_COEF": "1.0"},
}


@pytest.mark.filterwarnings("ignore:advantage mode 'only' without process advantages")  # upstream warns too
@pytest.mark.parametrize("case", list(OBJECTIVE_CASES))
def test_loss_from_upstream_variables_equals_upstreams_trainer(case: str) -> None:
    env = OBJECTIVE_CASES[case]
    v = {**SCRIPT, **SHORT_ENV, **env}
    cfg = _cfg(env)
    group = 4
    traj, prm = _rollout(cfg, num_prompts=2, group=group)
    b, n = traj.batch_size, traj.num_steps
    gen = torch.Generator().manual_seed(list(OBJECTIVE_CASES).index(case))
    trl, latent = torch.randn(b, generator=gen), torch.randn(b, generator=gen)
    # old and new log-probs: ratios on both sides of the 1e-4 clip range
    logp_old = traj.log_probs
    logp_new = logp_old + 3e-4 * torch.randn(b, n, generator=gen)
    ks = torch.arange(n - 1)  # upstream never trains the last transition
    # upstream records the PRM score of the step's input latent x_i at its guided steps, 0 elsewhere
    process = None
    if upstream_use_process_reward(v):
        process = torch.zeros(b, n)
        for i in range(n):
            if upstream_should_apply(v, i, n):
                process[:, i] = prm.reward(traj.latents[:, i])
    ratio = torch.exp(logp_new - logp_old)
    expected = upstream_loss(v, trl, latent, process, ratio, group)[:, ks].mean(1)

    adv = compute_advantages(traj, trl, latent if cfg.rewards.latent_outcome else None, cfg)
    ours = torch.stack([
        dual_reward_policy_loss(logp_new[j, ks], logp_old[j, ks], [(w, a[j, ks]) for w, a in adv.terms],
                                cfg.optim.clip_range)[0]
        for j in range(b)
    ])
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(expected, torch.zeros_like(expected))


def test_script_objective_is_twice_the_outcome_plus_latent_outcome_plus_process() -> None:
    """The upstream digest's section 4.4, written as the effective objective: 2ℓ(A_o) + ℓ(A_lo) + ℓ(A_p)."""
    cfg = _cfg({})
    traj, prm = _rollout(cfg, num_prompts=2, group=4)
    gen = torch.Generator().manual_seed(5)
    trl, latent = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    adv = compute_advantages(traj, trl, latent, cfg)
    a_o, a_lo = upstream_group_advantage(trl, 4), upstream_group_advantage(latent, 4)
    process = torch.zeros(8, 6)
    for i in (3, 4, 5):
        process[:, i] = prm.reward(traj.latents[:, i])
    a_p = upstream_group_advantage(process, 4)
    ratio = 1 + 3e-4 * torch.randn(8, 6, generator=torch.Generator().manual_seed(6))

    def ell(a: torch.Tensor) -> torch.Tensor:
        a = a.clamp(-5, 5)
        return torch.maximum(-a * ratio, -a * ratio.clamp(1 - 1e-4, 1 + 1e-4))

    expected = 2 * ell(a_o[:, None].expand(8, 6)) + ell(a_lo[:, None].expand(8, 6)) + ell(a_p)
    ours = sum(w * ell(a) for w, a in adv.terms)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_upstream_variables_that_upstream_would_act_on_are_not_dropped() -> None:
    with pytest.raises(ConfigError, match="VIDEO_ALIGN_IN_TRL_REWARD_ENABLED=true"):
        load_config(None, environ={"VIDEO_ALIGN_IN_TRL_REWARD_ENABLED": "true"})
    with pytest.raises(ConfigError, match="KL_TYPE: 'sideways'"):
        load_config(None, environ={"KL_TYPE": "sideways"})
    with pytest.raises(ConfigError, match="PROCESS_REWARD_ADVANTAGE_MODE: 'most'"):
        load_config(None, environ={"PROCESS_REWARD_ADVANTAGE_MODE": "most"})
    cfg = load_config(None, environ={"USE_DELTA_T_FOR_GRADIENT_SCALING": "false"})  # flux_step.py: RGG and SPSA
    assert cfg.rgg.delta_t_scaling is False and cfg.spsa.delta_t_scaling is False


# ------------------------------------------------------------------------------ 5. the network timestep
def upstream_timesteps(num_steps: int, shift: float) -> list[int]:
    """sampling.py:131-132 and 339-340, flux_step.py:11-13: an fp32 schedule, then int(sigma * 1000) per entry."""
    t = torch.linspace(1, 0, num_steps + 1)
    sigmas = (shift * t) / (1 + (shift - 1) * t)
    return [int(sigma * 1000) for sigma in sigmas]


@pytest.mark.parametrize(("num_steps", "shift"), [(16, 5.0), (50, 1.0), (16, 3.0), (30, 7.0), (20, 5.0)])
def test_fp32_timestep_arithmetic_gives_upstreams_timesteps(num_steps: int, shift: float) -> None:
    ours = network_timestep(sigma_schedule(num_steps, shift, "fp32"), "fp32").tolist()
    assert ours == upstream_timesteps(num_steps, shift)


def test_default_timesteps_differ_from_upstreams_by_one_where_docs_say() -> None:
    """docs/config.md point 5: 50 steps at shift 1, 33 of 51 differ (26 one lower, 7 one higher); 16/5 agree."""
    default = network_timestep(sigma_schedule(50, 1.0)).tolist()
    diffs = [a - b for a, b in zip(default, upstream_timesteps(50, 1.0)) if a != b]
    assert (len(diffs), diffs.count(-1), diffs.count(1)) == (33, 26, 7)
    assert network_timestep(sigma_schedule(16, 5.0)).tolist() == upstream_timesteps(16, 5.0)


def test_policy_in_fp32_mode_feeds_upstreams_timesteps_to_the_transformer() -> None:
    """The rollout's σ schedule is upstream's bit for bit, and the transformer sees upstream's int timesteps."""
    cfg = load_config(REPO / "configs" / "upstream.yaml", ["sampler.num_steps=50", "sampler.shift=1.0",
                                                         "rgg.enabled=false"], use_env=False)
    policy = HunyuanVideoPolicy(tiny_transformer(0), None, timestep_arithmetic=cfg.sampler.timestep_arithmetic)
    seen: list[list[int]] = []
    policy.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].tolist()),
                                                 with_kwargs=True)
    cond = make_cond(num_prompts=1, group_size=2)
    traj = sample_trajectories(policy, cond, sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa, prm=None,
                               latent_shape=LATENT_SHAPE, group_size=2, generator=make_generators([0, 1]))
    t = torch.linspace(1, 0, 51)
    assert torch.equal(traj.sigmas, (1.0 * t) / (1 + 0.0 * t))
    assert [s[0] for s in seen] == upstream_timesteps(50, 1.0)[:50]
    assert all(len(set(s)) == 1 for s in seen)


# ------------------------------------------------------------------------------------ 6. fp64 stays fp64
@pytest.mark.parametrize("noise_type", ["dance", "flow"])
def test_fp64_latents_with_float_sigma_keep_an_fp64_std_and_log_prob(noise_type: str) -> None:
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xi = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    s, s2, eta, a = 0.6180339887498949, 0.4142135623730951, 0.25, 0.7
    out = sde_step(x, v, s, s2, noise_type=noise_type, eta=eta, flow_a=a, noise=xi)
    g = eta if noise_type == "dance" else a * math.sqrt(s / (1 - s))
    std = g * math.sqrt(s - s2)  # python floats: fp64 throughout
    assert out.std.dtype == torch.float64 and out.log_prob.dtype == torch.float64
    assert abs(float(out.std) - std) <= 1e-15 * std
    mean = x - (s - s2) * v - 0.5 * g**2 * (s - s2) * (x + (1 - s) * v) / s
    x_next = mean + std * xi
    torch.testing.assert_close(out.x_next, x_next, rtol=1e-14, atol=1e-15)
    logp = (-((x_next - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2))
    torch.testing.assert_close(out.log_prob, logp, rtol=1e-13, atol=1e-13)


# ------------------------------------------------------------------------------------------- 7. the KL
def upstream_kl(v_policy: torch.Tensor, v_ref: torch.Tensor, sigma: float, delta_t: float, eta: float) -> float:
    """kl_divergence.py:28-81: mean((v − v_ref)²)·Δt/(2·max(η², 1e-8)·max(σ², 1e-8)), Δt floored at 1e-8."""
    diff_squared = (v_policy - v_ref).pow(2)
    normalization = 2 * max(eta**2, 1e-8) * max(sigma**2, 1e-8)
    return float(diff_squared.mean() * max(delta_t, 1e-8) / normalization)


def test_upstream_kl_form_matches_upstreams_formula_and_relates_to_the_gaussian_kl() -> None:
    sched = sigma_schedule(16, 5.0, "fp32")
    gen = torch.Generator().manual_seed(0)
    for i in (0, 7, 12, 13, 14):
        s, s2 = float(sched[i]), float(sched[i + 1])
        x, v, v_ref = (torch.randn(1, 4, 2, 3, 3, generator=gen, dtype=torch.float64) for _ in range(3))
        ours = upstream_velocity_kl(v, v_ref, s, s - s2, 0.25)
        assert float(ours) == pytest.approx(upstream_kl(v, v_ref, s, s - s2, 0.25), rel=1e-12)
        # the exact Gaussian KL of the two unguided kernels is σ²(1 + η²(1−σ)/(2σ))² times upstream's form
        exact = gaussian_kl(unguided_mean(x, v, s, s2, "dance"), unguided_mean(x, v_ref, s, s2, "dance"),
                            0.25 * math.sqrt(s - s2))
        factor = s**2 * (1 + 0.25**2 * (1 - s) / (2 * s)) ** 2
        assert float(exact) == pytest.approx(factor * float(ours), rel=1e-10)


def test_learner_with_upstream_kl_variables_reports_upstreams_kl() -> None:
    cfg = _cfg({"USE_KL_LOSS": "true", "KL_COEF": "0.5", "PROCESS_LATENT_REWARD_ENABLED": "false"},
               ["optim.timestep_fraction=1.0"])
    assert (cfg.optim.kl_coef, cfg.optim.kl_form) == (0.5, "upstream")
    reference = tiny_policy(seed=4)
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    traj, _ = _rollout(cfg, num_prompts=1, group=2)
    adv = compute_advantages(traj, torch.tensor([0.0, 1.0]), torch.tensor([0.3, -0.2]), cfg)
    expect = []
    with torch.no_grad():
        for j in range(2):
            per_k = []
            for k in range(5):
                s, s2 = float(traj.sigmas[k]), float(traj.sigmas[k + 1])
                x, c = traj.latents[j : j + 1, k], traj.cond.index([j])
                per_k.append(upstream_kl(policy.velocity(x, torch.tensor([s]), c),
                                         reference.velocity(x, torch.tensor([s]), c), s, s - s2, cfg.sampler.eta))
            expect.append(sum(per_k) / 5)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.optim.lr)
    stats = grpo_update(policy, opt, traj, adv.terms, cfg, torch.Generator().manual_seed(0),
                        reference_policy=reference)
    assert stats["kl"] == pytest.approx(sum(expect) / 2, rel=1e-4)


# ------------------------------------------------------------------- 8. three sets of defaults, the preset
# scripts/train_grpo_hunyuan.sh, the settings written out as our keys (the torchrun flags at lines 308-398 included)
SCRIPT_AS_KEYS = {
    "seed": 42, "steps": 501, "sampler.num_steps": 16, "sampler.shift": 5.0, "sampler.eta": 0.25,
    "sampler.noise_type": "dance", "sampler.group_size": 8, "sampler.same_initial_noise": True,
    "sampler.timestep_arithmetic": "fp32", "data.num_frames": 32, "data.height": 480, "data.width": 480,
    "data.shuffle_seed": 1237, "model.embedded_guidance": 6018.0,
    "rgg.enabled": True, "rgg.scale": 0.01, "rgg.scale_mode": "fixed", "rgg.kl_beta": 3.125,
    "rgg.delta_t_scaling": True, "rgg.normalize": False, "rgg.start": 12, "rgg.end": None, "rgg.interval": 1,
    "rgg.guided_fraction": 1.0, "advantage.process_credit": "input",
    "spsa.enabled": False, "spsa.sigma": 0.01, "spsa.scale": 0.01, "spsa.kl_beta": 0.3125,
    "spsa.delta_t_scaling": True, "spsa.normalize": False, "spsa.num_samples": 1, "spsa.start": 12,
    "spsa.end": None, "spsa.interval": 1,
    "rewards.orm.enabled": True, "rewards.orm.coef": 1.0, "rewards.orm.prompt_variant": "deformity_physics",
    "rewards.latent_outcome": True, "rewards.latent_outcome_coef_in_score": 0.0, "rewards.prm.use_sigmoid": False,
    "advantage.mode": "both", "advantage.combine": "upstream", "advantage.outcome_weight": 1.0,
    "advantage.pixel_outcome_weight": 1.0, "advantage.latent_outcome_weight": 1.0, "advantage.process_weight": 1.0,
    "advantage.clamp": 5.0,
    "optim.lr": 1e-6, "optim.weight_decay": 1e-4, "optim.grad_clip": 1.0, "optim.clip_range": 1e-4,
    "optim.timestep_fraction": 0.6, "optim.timestep_selection": "fraction", "optim.grad_accum": 4,
    "optim.train_last_transition": False, "optim.logprob_reduction": "mean", "optim.logprob_mean": "unguided",
    "optim.logprob_mean_training": "unguided", "optim.kl_coef": 0.0, "optim.kl_form": "upstream",
    "optim.distill_coef": 0.0, "output.save_every": 25,
}


def _get(cfg: RunConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def test_preset_is_the_launch_script_written_out() -> None:
    preset = load_config(REPO / "configs" / "upstream.yaml", use_env=False)
    wrong = {k: (_get(preset, k), want) for k, want in SCRIPT_AS_KEYS.items() if _get(preset, k) != want}
    assert wrong == {}


def test_launch_script_variables_agree_with_the_preset() -> None:
    preset = load_config(REPO / "configs" / "upstream.yaml", use_env=False)
    assert load_config(REPO / "configs" / "upstream.yaml", environ=SCRIPT) == preset
    from_env = load_config(None, environ=SCRIPT)  # our defaults + the script's variables
    env_keys = [k for k in SCRIPT_AS_KEYS if k.split(".")[0] in ("rgg", "spsa", "rewards", "advantage")
                or k.startswith("optim.logprob") or k == "optim.kl_coef"]
    assert {k: _get(from_env, k) for k in env_keys} == {k: SCRIPT_AS_KEYS[k] for k in env_keys}


def test_upstream_dataclass_defaults_as_variables_give_the_dataclass_behaviour() -> None:
    """reward_args.py:22-274 defaults: no RGG (switches off), mode none, guided-mean log-probs, scale 0.1, …"""
    dataclass = {
        "TRL_CORE_ENABLED": "true", "SCORE_COEF": "1.0", "LATENT_REWARD_IN_TRL_REWARD_ENABLED": "false",
        "LATENT_REWARD_IN_TRL_REWARD_COEF": "1.0", "PROCESS_LATENT_REWARD_ENABLED": "false",
        "PROCESS_LATENT_REWARD_SAMPLING_ENABLED": "false", "PROCESS_LATENT_REWARD_TRAINING_ENABLED": "false",
        "PROCESS_LATENT_REWARD_GUIDANCE_SCALE": "0.1", "PROCESS_LATENT_REWARD_START_STEP": "0",
        "PROCESS_LATENT_REWARD_NORMALIZE_GRADIENT": "true", "PROCESS_LATENT_REWARD_KL_BETA": "0.1",
        "USE_DELTA_T_FOR_GRADIENT_SCALING": "false", "PROCESS_REWARD_ADVANTAGE_MODE": "none",
        "PROCESS_REWARD_ADVANTAGE_COEF": "1.0", "OUTCOME_REWARD_ADVANTAGE_COEF": "1.0",
        "USE_REWARD_GUIDED_MEAN_FOR_LOGPROB": "true", "USE_REWARD_GUIDED_MEAN_FOR_LOGPROB_TRAINING": "true",
    }
    cfg = load_config(None, environ=dataclass)
    assert cfg.rgg.enabled is False and cfg.advantage.mode == "none"
    assert (cfg.rgg.scale, cfg.rgg.normalize, cfg.rgg.kl_beta, cfg.rgg.delta_t_scaling, cfg.rgg.start) == (
        0.1, True, 0.1, False, 0)
    assert cfg.optim.logprob_mean == "guided"
    assert cfg.optim.logprob_mean_training == "unguided"  # no training-time gradient: upstream's flag is inert
    # mode none: the terms are score (SCORE_COEF) and trl (1); the latent model is off
    assert (cfg.advantage.combine, cfg.advantage.outcome_weight, cfg.advantage.pixel_outcome_weight) == (
        "upstream", 1.0, 1.0)
    assert cfg.rewards.latent_outcome is False


def test_docs_show_the_three_columns_and_every_variable() -> None:
    doc = (REPO / "docs" / "config.md").read_text()
    preset = load_config(REPO / "configs" / "upstream.yaml", use_env=False)
    table = defaults_table_markdown(preset)
    assert table in doc, "docs/config.md is stale: regenerate with upstream_env.defaults_table_markdown(preset)"
    rows = {line.split("|")[2].strip(" `"): [c.strip() for c in line.split("|")[3:6]]
            for line in table.splitlines()[2:]}
    # issue 18 point 8: the dataclass defaults that differ from the script
    assert rows["rgg.scale"][:2] == ["0.1", "0.01"]
    assert rows["rgg.normalize"][:2] == ["true", "false"]
    assert rows["rgg.kl_beta"][:2] == ["0.1", "3.125"]
    assert rows["rgg.delta_t_scaling"][:2] == ["false", "true"]
    assert rows["rgg.start"][:2] == ["0", "12"]
    assert rows["optim.logprob_mean"][0].startswith("true") and rows["optim.logprob_mean"][1].startswith("false")
    assert rows["advantage.mode"][:2] == ["none", "both"]
    assert rows["advantage.combine"][2] == RunConfig().advantage.combine
