"""Benchmark runs in-process: one method on one task at one or several seeds, each step the library's Euphonium step.

Each training step is :func:`train_step`: ``step.rollout`` → ``step.score`` (decode + task reward, + PRM latent
outcome) → ``step.advantages`` → ``step.learn``, the calls the Ray actors make, with no algorithm of its own. Several seeds of one (task, method) train as one :class:`~euphonium_ray.ensemble.PolicyEnsemble` (one batched
network on a GPU; on a CPU the same arithmetic, no faster): every member has its own seed, adapters, noise,
transition subsets, optimizer state and clipping, exactly as a run alone. A step's wall-clock and process-CPU
seconds are measured around the step (an ensemble's are shared by its members); held-out evaluation (unguided ODE
samples from fixed noise, :func:`heldout_reward`) is timed apart and never counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from euphonium_ray.bench.world import BenchWorld
from euphonium_ray.config import RunConfig
from euphonium_ray.ensemble import PolicyEnsemble
from euphonium_ray.models.base import OutcomeRewardModel, Policy, TextConditioning
from euphonium_ray.sampling import prompts_for_step, sample_latents, seeds_for
from euphonium_ray.step import (advantages, build_optimizer, learn, learning_batch, rollout, score, uses_prm,
                                wants_latent_outcome)
from euphonium_ray.trajectory import Trajectories

__all__ = ["EnsembleRun", "StepResult", "guidance_to_noise", "heldout_reward", "train_step"]


@dataclass
class StepResult:
    """What one training step logs, per member: task rewards of its rollouts, learner statistics; and shared
    phase timings."""

    rewards: list[Tensor]
    stats: list[dict[str, float]]
    timings: dict[str, float]
    skipped_groups: int
    guidance_norm: list[float]
    process_reward: list[float]
    guidance_to_noise: list[float]


def guidance_to_noise(traj: Trajectories, cfg: RunConfig) -> float:
    """Mean over guided samples and guided steps of ‖guided − unguided mean‖ / (std·√D): how far guidance moves a
    transition compared with the length of its noise draw (0 when nothing was guided)."""
    if traj.guided_steps.numel() == 0:
        return 0.0
    k = traj.guided_steps
    std = cfg.sampler.sde(traj.sigmas).std(traj.sigmas[k], traj.sigmas[k + 1])
    norms = torch.linalg.vector_norm(traj.guidance_shifts.flatten(2), dim=2)  # (B, M)
    if traj.guided_rows is not None:
        norms = norms[traj.guided_rows]
    if norms.numel() == 0:
        return 0.0
    dim = traj.guidance_shifts[0, 0].numel()
    return float((norms / (std.to(norms) * dim**0.5)).mean())


def train_step(policy: Policy, optimizer: torch.optim.Optimizer, world: BenchWorld, cfg: RunConfig, step: int,
               prompt_indices: list[int], run_seeds: list[int], orm: OutcomeRewardModel, prm: Any,
               reference: Policy | None = None) -> StepResult:
    """Sample G rollouts per prompt for every member (run seed), score them, and do one GRPO pass.

    ``prompt_indices`` index the world's training prompts (as the driver's dataset of training prompts does); every
    member sees the same prompts (the order is a function of the step) with its own per-sample seeds."""
    g, k = cfg.sampler.group_size, len(run_seeds)
    timings: dict[str, float] = {}
    cond, captions = world.conditioning([world.train[i] for i in prompt_indices], g)
    cond_all = TextConditioning.cat([cond] * k)
    captions_all = captions * k
    seeds = [s for rs in run_seeds for s in seeds_for(rs, step, prompt_indices, g, len(world.train))]

    def score_videos(latents: Tensor, caps: list[str]) -> Tensor:
        return world.decode_and_score(orm, latents, caps)

    def spsa_score(points: Tensor, rows: Tensor) -> Tensor:
        return score_videos(points, [captions_all[int(r)] for r in rows])

    def score_clean(latents: Tensor, c: TextConditioning) -> Tensor:
        return prm.score(latents, torch.zeros(latents.shape[0]), c).float()

    t0 = time.perf_counter()
    traj = rollout(policy, cond_all, cfg, prm=prm, seeds=seeds, latent_shape=world.latent_shape,
                   prompt_indices=[p for _ in run_seeds for p in prompt_indices for _ in range(g)],
                   captions=captions_all, spsa_score_fn=spsa_score if cfg.spsa.enabled else None, timings=timings)
    timings["sampling"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rewards = score(traj, score_videos, score_clean if prm is not None and wants_latent_outcome(cfg) else None)
    adv = advantages(traj, rewards, cfg)
    timings["rewards"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = learn(policy, optimizer, learning_batch(traj, adv, k), cfg, step=step, run_seeds=run_seeds,
                reference=reference)
    stats: list[dict[str, float]] = out.get("members", [out]) if out else [{} for _ in run_seeds]
    timings["update"] = time.perf_counter() - t0
    per = traj.batch_size // k
    parts = [traj.select(torch.arange(m * per, (m + 1) * per)) for m in range(k)] if k > 1 else [traj]
    evaluated = [p.process_evaluated for p in parts]
    return StepResult(
        rewards=[rewards.orm[m * per:(m + 1) * per] for m in range(k)],
        stats=stats,
        timings=timings,
        skipped_groups=len(adv.skipped_groups),
        guidance_norm=[float(p.guidance_norms[e].mean()) if bool(e.any()) else 0.0 for p, e in zip(parts, evaluated)],
        process_reward=[float(p.process_rewards[e].nanmean()) if bool(e.any()) else 0.0
                        for p, e in zip(parts, evaluated)],
        guidance_to_noise=[guidance_to_noise(p, cfg) for p in parts],
    )


@torch.no_grad()
def heldout_reward(policy: Policy, world: BenchWorld, cfg: RunConfig, orm: OutcomeRewardModel, noise: Tensor,
                   samples_per_prompt: int, members: int = 1) -> Tensor:
    """Task rewards (members, E) of unguided ODE samples on the held-out prompts from the fixed noise (what a user
    deploys); every member starts from the same noise."""
    cond, captions = world.conditioning(world.heldout, samples_per_prompt)
    cond = TextConditioning.cat([cond] * members)
    x = sample_latents(policy, cond, latent_shape=world.latent_shape, num_steps=cfg.sampler.num_steps,
                       shift=cfg.sampler.shift, noise_type="ode", initial_noise=noise.repeat(members, *[1] * (noise.ndim - 1)))
    return world.decode_and_score(orm, x, captions * members).reshape(members, -1)


class EnsembleRun:
    """A method on a task at one or more seeds: its policy (an ensemble for several seeds) and optimizer;
    ``step()`` trains, ``evaluate()`` measures; both return one record per seed."""

    def __init__(self, task: str, method: str, cfg: RunConfig, world: BenchWorld, seeds: list[int],
                 eval_noise: Tensor, samples_per_prompt: int) -> None:
        if not seeds:
            raise ValueError("a run needs at least one seed")
        self.task, self.method, self.seeds = task, method, list(seeds)
        self.cfg = cfg.model_copy(deep=True)
        self.world = world
        trainable = "lora" if cfg.model.trainable == "lora" else "full"
        policies = [world.load_policy(trainable, seed=s) for s in seeds]
        self.policy: Any = policies[0] if len(seeds) == 1 else PolicyEnsemble(policies)
        self.optimizer = build_optimizer(self.policy.trainable_parameters(), self.cfg.optim)
        self.orm = world.reward(self.cfg)
        self.prm = world.process_reward(self.cfg, policy=self.policy) if uses_prm(self.cfg) else None
        self.reference = world.load_policy("none") if self.cfg.optim.kl_coef > 0 else None
        self.eval_noise, self.samples_per_prompt = eval_noise, samples_per_prompt
        self.steps_done = 0
        self.wall_seconds = 0.0
        self.cpu_seconds = 0.0

    def _sync(self) -> None:
        if self.world.device.type == "cuda":
            torch.cuda.synchronize(self.world.device)

    def step(self) -> list[dict[str, Any]]:
        """One training step of every member; records of rollouts drawn by the policy after ``steps_done`` updates."""
        t = self.steps_done
        prompts = prompts_for_step(t, len(self.world.train), self.cfg.data.prompts_per_step,
                                   self.cfg.data.shuffle_seed)
        self._sync()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        res = train_step(self.policy, self.optimizer, self.world, self.cfg, t, prompts, self.seeds, self.orm,
                         self.prm, self.reference)
        self._sync()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        self.wall_seconds += wall
        self.cpu_seconds += cpu
        self.steps_done += 1
        records = []
        for m, seed in enumerate(self.seeds):
            r = res.rewards[m]
            records.append({
                "task": self.task, "method": self.method, "seed": seed, "step": t,
                "train_reward": float(r.mean()),
                "train_reward_std": float(r.std()) if r.numel() > 1 else 0.0,
                "seconds": wall, "cpu_seconds": cpu, "cum_seconds": self.wall_seconds,
                "cum_cpu_seconds": self.cpu_seconds, "ensemble_members": len(self.seeds),
                "prompts": [self.world.train[i] for i in prompts],
                "skipped_groups": res.skipped_groups,
                "guidance_norm": res.guidance_norm[m],
                "process_reward": res.process_reward[m],
                "guidance_to_noise": res.guidance_to_noise[m],
                "timings": {k: round(v, 4) for k, v in res.timings.items()},
                **{f"learner/{k}": float(v) for k, v in res.stats[m].items()},
            })
        return records

    def evaluate(self) -> list[dict[str, Any]]:
        """Held-out ODE reward of every member after ``steps_done`` updates (not counted in the run's seconds)."""
        t0 = time.perf_counter()
        r = heldout_reward(self.policy, self.world, self.cfg, self.orm, self.eval_noise, self.samples_per_prompt,
                           len(self.seeds))
        seconds = time.perf_counter() - t0
        return [{
            "task": self.task, "method": self.method, "seed": seed, "step": self.steps_done,
            "heldout_reward": float(r[m].mean()),
            "heldout_reward_std": float(r[m].std()) if r.shape[1] > 1 else 0.0,
            "cum_seconds": self.wall_seconds, "cum_cpu_seconds": self.cpu_seconds, "eval_seconds": seconds,
        } for m, seed in enumerate(self.seeds)]
