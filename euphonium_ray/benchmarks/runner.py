"""One benchmark run (a method at a seed), in-process: library sampling, rewards, advantages and GRPO updates.

Each training step is :func:`train_step` — ``sampling.sample_trajectories`` → decode + toy ORM (+ PRM latent outcome)
→ ``learning.compute_advantages`` → ``learning.grpo_update`` — the same library calls the Ray actors make, with no
algorithm of its own. A step's wall-clock and process-CPU seconds are measured around exactly that; held-out
evaluation (unguided ODE samples from fixed noise, :func:`heldout_reward`) is timed apart and never counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from euphonium_ray.benchmarks.world import BenchWorld
from euphonium_ray.config import RunConfig
from euphonium_ray.learning import compute_advantages, grpo_update
from euphonium_ray.models.base import Policy, ProcessRewardModel
from euphonium_ray.sampling import (make_generators, prompts_for_step, sample_latents, sample_seed,
                                    sample_trajectories, seeds_for)
from euphonium_ray.sde import flow_sigma_1, step_std
from euphonium_ray.trajectory import Trajectories

__all__ = ["MethodRun", "StepResult", "guidance_to_noise", "heldout_reward", "train_step", "uses_prm",
           "wants_latent_outcome"]


def uses_prm(cfg: RunConfig) -> bool:
    """Whether a method needs the PRM: for guidance/process rewards (RGG window) or the latent outcome term."""
    return cfg.rgg.enabled or wants_latent_outcome(cfg)


def wants_latent_outcome(cfg: RunConfig) -> bool:
    """The PRM score of the final x̂0 enters the advantages (as a term or inside the outcome score)."""
    r = cfg.rewards
    return r.latent_outcome and (cfg.advantage.latent_outcome_weight != 0 or r.latent_outcome_coef_in_score != 0)


@dataclass
class StepResult:
    """What one training step logs (ORM rewards of its rollouts, learner statistics, phase timings)."""

    orm_rewards: Tensor
    stats: dict[str, float]
    timings: dict[str, float]
    skipped_groups: int
    guidance_norm: float
    process_reward: float
    guidance_to_noise: float


def guidance_to_noise(traj: Trajectories, cfg: RunConfig) -> float:
    """Mean over samples and guided steps of ‖guided − unguided mean‖ / (std·√D): how far guidance moves a
    transition compared with the length of its noise draw (0 when nothing was guided)."""
    if traj.guided_steps.numel() == 0:
        return 0.0
    k = traj.guided_steps
    sp = cfg.sampler
    std = step_std(traj.sigmas[k], traj.sigmas[k + 1], sp.noise_type, eta=sp.eta, flow_a=sp.flow_a,
                   sigma_1=flow_sigma_1(traj.sigmas))
    norms = torch.linalg.vector_norm(traj.guidance_shifts.flatten(2), dim=2)  # (B, M)
    dim = traj.guidance_shifts[0, 0].numel()
    return float((norms / (std.to(norms) * dim**0.5)).mean())


def train_step(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    world: BenchWorld,
    cfg: RunConfig,
    step: int,
    prompt_indices: list[int],
    prm: ProcessRewardModel | None,
    reference: Policy | None = None,
) -> StepResult:
    """Sample G rollouts per prompt with the method's sampler, score them, and do one GRPO pass.

    ``prompt_indices`` index the world's training prompts (as the driver's dataset of training prompts does)."""
    g = cfg.sampler.group_size
    timings: dict[str, float] = {}
    cond, captions = world.conditioning([world.train[i] for i in prompt_indices], g)
    seeds = seeds_for(cfg.seed, step, prompt_indices, g, len(world.train))

    def spsa_score(points: Tensor, rows: Tensor) -> Tensor:
        return world.decode_and_score(points, [captions[int(r)] for r in rows])

    t0 = time.perf_counter()
    traj = sample_trajectories(
        policy, cond, sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa, prm=prm if cfg.rgg.enabled else None,
        latent_shape=world.latent_shape, group_size=g, generator=make_generators(seeds),
        spsa_score_fn=spsa_score if cfg.spsa.enabled else None, same_initial_noise=cfg.sampler.same_initial_noise,
        logprob_mean=cfg.optim.logprob_mean, reduction=cfg.optim.logprob_reduction,
        prompt_indices=[p for p in prompt_indices for _ in range(g)], sample_seeds=seeds, captions=captions,
        timings=timings,
    )
    timings["sampling"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    orm = world.decode_and_score(traj.x0_hat_final, captions)
    latent = None
    if prm is not None and wants_latent_outcome(cfg):
        latent = prm.score(traj.x0_hat_final, torch.zeros(traj.batch_size), traj.cond).float()
    adv = compute_advantages(traj, orm, latent, cfg)
    timings["rewards"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats: dict[str, float] = {}
    if adv.kept_rows.numel() and adv.terms:
        # the learner actor's generator for the transition subset (actors/learner.py), so --ray picks the same ones
        update_generator = torch.Generator().manual_seed(sample_seed(cfg.seed, step, -1, 0))
        stats = grpo_update(policy, optimizer, traj.select(adv.kept_rows), adv.terms, cfg, update_generator, reference)
    timings["update"] = time.perf_counter() - t0
    evaluated = traj.process_evaluated
    return StepResult(
        orm_rewards=orm,
        stats=stats,
        timings=timings,
        skipped_groups=len(adv.skipped_groups),
        guidance_norm=float(traj.guidance_norms[evaluated].mean()) if bool(evaluated.any()) else 0.0,
        process_reward=float(traj.process_rewards[evaluated].nanmean()) if bool(evaluated.any()) else 0.0,
        guidance_to_noise=guidance_to_noise(traj, cfg),
    )


@torch.no_grad()
def heldout_reward(policy: Policy, world: BenchWorld, cfg: RunConfig, noise: Tensor, samples_per_prompt: int) -> Tensor:
    """ORM rewards (B,) of unguided ODE samples on the held-out prompts from the fixed noise (what a user deploys)."""
    cond, captions = world.conditioning(world.heldout, samples_per_prompt)
    x = sample_latents(policy, cond, latent_shape=world.latent_shape, num_steps=cfg.sampler.num_steps,
                       shift=cfg.sampler.shift, noise_type="ode", initial_noise=noise)
    return world.decode_and_score(x, captions)


class MethodRun:
    """A method at one seed: its own policy copy and optimizer; ``step()`` trains, ``evaluate()`` measures."""

    def __init__(self, method: str, cfg: RunConfig, world: BenchWorld, seed: int, eval_noise: Tensor,
                 samples_per_prompt: int) -> None:
        self.method, self.seed = method, seed
        self.cfg = cfg.model_copy(deep=True)
        self.cfg.seed = seed
        self.world = world
        self.policy = world.load_policy("lora" if cfg.model.trainable == "lora" else "full")
        o = self.cfg.optim
        self.optimizer = torch.optim.AdamW(self.policy.trainable_parameters(), lr=o.lr, betas=o.betas, eps=o.adam_eps,
                                           weight_decay=o.weight_decay)
        self.prm = world.prm if uses_prm(self.cfg) else None
        self.reference = world.load_policy("none") if o.kl_coef > 0 else None
        self.eval_noise, self.samples_per_prompt = eval_noise, samples_per_prompt
        self.steps_done = 0
        self.wall_seconds = 0.0
        self.cpu_seconds = 0.0
        self.last_reward = float("nan")

    def step(self) -> dict[str, Any]:
        """One training step; returns its log record (rewards of the rollouts of the policy after ``step`` updates)."""
        t = self.steps_done
        prompts = prompts_for_step(t, len(self.world.train), self.cfg.data.prompts_per_step,
                                   self.cfg.data.shuffle_seed)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        res = train_step(self.policy, self.optimizer, self.world, self.cfg, t, prompts, self.prm, self.reference)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        self.wall_seconds += wall
        self.cpu_seconds += cpu
        self.steps_done += 1
        r = res.orm_rewards
        self.last_reward = float(r.mean())
        return {
            "step": t,
            "train_reward": float(r.mean()),
            "train_reward_std": float(r.std()) if r.numel() > 1 else 0.0,
            "seconds": wall,
            "cpu_seconds": cpu,
            "cum_seconds": self.wall_seconds,
            "cum_cpu_seconds": self.cpu_seconds,
            "prompts": [self.world.train[i] for i in prompts],
            "skipped_groups": res.skipped_groups,
            "guidance_norm": res.guidance_norm,
            "process_reward": res.process_reward,
            "guidance_to_noise": res.guidance_to_noise,
            "timings": {k: round(v, 4) for k, v in res.timings.items()},
            **{f"learner/{k}": float(v) for k, v in res.stats.items()},
        }

    def evaluate(self) -> dict[str, Any]:
        """Held-out ODE reward of the policy after ``steps_done`` updates (not counted in the run's seconds)."""
        t0 = time.perf_counter()
        r = heldout_reward(self.policy, self.world, self.cfg, self.eval_noise, self.samples_per_prompt)
        return {
            "step": self.steps_done,
            "heldout_reward": float(r.mean()),
            "heldout_reward_std": float(r.std()) if r.numel() > 1 else 0.0,
            "cum_seconds": self.wall_seconds,
            "cum_cpu_seconds": self.cpu_seconds,
            "eval_seconds": time.perf_counter() - t0,
        }
