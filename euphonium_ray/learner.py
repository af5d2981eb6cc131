"""The learner's state and its step, with no Ray: what ``actors/learner.py`` runs inside each Ray Train worker.

A :class:`Learner` holds one data-parallel rank's fp32 master weights (fully sharded under ``cluster.fsdp``, see
``sharding.py``), the AdamW of ``step.build_optimizer`` and a frozen reference policy for the KL term. Its
:meth:`Learner.step` is the learner's half of a Euphonium step: ``step.learn`` on the rank's share of the batch
(gradients averaged across ranks before every optimizer step), the new weights to broadcast (version = step + 1)
with their digest, and a checkpoint on the steps that write one (rank 0 writes; under FSDP every rank joins the
gathers).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from euphonium_ray.checkpoint import (config_hash, load_checkpoint, read_optimizer_state, save_checkpoint,
                                      state_digest)
from euphonium_ray.config import RunConfig
from euphonium_ray.publish import BucketLayout, fingerprint, fingerprint_id
from euphonium_ray.roles import load_policy, rollout_weight_dtype
from euphonium_ray.sharding import (average_gradients, broadcast_parameters, full_model_state, full_optimizer_state,
                                    full_state_on_device, load_full_optimizer_state, shard_transformer)
from euphonium_ray.step import LearnBatch, build_optimizer, learn

__all__ = ["Learner", "LearnerStep"]


@dataclass
class LearnerStep:
    """What one learner step gives back: its statistics, the weights to broadcast and where a checkpoint went."""

    stats: dict[str, Any]
    weights: dict[str, Tensor]
    checkpoint: Path | None = None


class Learner:
    """One data-parallel rank of the learner. ``Learner.load`` builds it from the run config (and a checkpoint to
    resume); ``step`` learns one batch."""

    def __init__(self, cfg: RunConfig, policy: Any, reference: Any | None, *, rank: int = 0, world: int = 1,
                 start_step: int = 0, resume: str | None = None) -> None:
        """``policy`` already holds the start weights (every rank's the same); ``resume`` (a checkpoint folder) gives
        the optimizer state."""
        self.cfg, self.policy, self.reference = cfg, policy, reference
        self.rank, self.world, self.start_step = rank, world, start_step
        self.sharded = cfg.cluster.fsdp
        self.sync_keys = list(policy.sync_state_dict())
        if self.sharded:  # each rank keeps 1/world of the fp32 masters, gradients and AdamW moments
            shard_transformer(policy.transformer, compute_dtype=policy.autocast_dtype)
            if reference is not None:
                shard_transformer(reference.transformer, compute_dtype=policy.autocast_dtype)
        self.optimizer = build_optimizer(policy.trainable_parameters(), cfg.optim)
        if resume:
            saved = read_optimizer_state(resume, self.optimizer)
            if self.sharded:
                load_full_optimizer_state(policy.transformer, self.optimizer, saved)
            else:
                self.optimizer.load_state_dict(saved)
        # FSDP reduce-scatters gradients itself; DDP ranks all-reduce them before each optimizer step
        self.grad_sync = average_gradients(world) if world > 1 and not self.sharded else None

    @classmethod
    def load(cls, cfg: RunConfig, device: torch.device, *, rank: int = 0, world: int = 1,
             resume: str | None = None) -> "Learner":
        """The learner's policy on ``device`` (resumed from ``resume``, rank 0's weights on every rank) and, for
        ``optim.kl_coef`` > 0, the frozen reference."""
        policy = load_policy(cfg, "learner", device)
        start = int(load_checkpoint(resume, policy)["step"]) if resume else 0
        if world > 1:
            broadcast_parameters(policy.transformer)
        reference = load_policy(cfg, "reference", device) if cfg.optim.kl_coef > 0 else None
        return cls(cfg, policy, reference, rank=rank, world=world, start_step=start, resume=resume)

    def weights(self) -> dict[str, Tensor]:
        """What a weight broadcast carries; under FSDP a collective whose full tensors land on rank 0 only, gathered
        one at a time on the device and cast there to the rollout dtype (nothing goes through host memory)."""
        if self.sharded:
            return full_state_on_device(self.policy.transformer, self.sync_keys, rollout_weight_dtype(self.cfg))
        return self.policy.sync_state_dict()

    def digest(self, state: dict[str, Tensor], version: int) -> str | None:
        """What names these weights in the statistics (ranks holding full weights compare it; a replayed step must
        give it again): the cheap fingerprint of the learner's weights, computed where they live (one read of the
        bytes); under ``cluster.weight_check: digest`` (debug: minutes per step at 13 B parameters) the full SHA-256
        of the weights as the rollout workers receive them (cast to their dtype), which ``param_digest`` of a
        rollout worker then equals."""
        if not state:
            return None
        if self.cfg.cluster.weight_check == "digest":
            dtype = rollout_weight_dtype(self.cfg)
            return state_digest({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
        # the version is not part of the name: equal weights give an equal digest whatever step made them
        return fingerprint_id(fingerprint(state, BucketLayout.for_state(state), 0))

    def writes_checkpoint(self, version: int) -> bool:
        out = self.cfg.output
        return version % out.save_every == 0 or (version == self.cfg.steps and out.write_final)

    def step(self, step: int, batch: LearnBatch) -> LearnerStep:
        """Learn ``batch`` (this rank's share of ``step``), then hand out weight version ``step + 1``: its digest
        (equal on every rank that holds full weights) and, when due, a checkpoint."""
        t0 = time.perf_counter()
        stats: dict[str, Any] = {"num_transitions": 0.0, "num_updates": 0.0}
        stats.update(learn(self.policy, self.optimizer, batch, self.cfg, step=step, run_seeds=[self.cfg.seed],
                           rank=self.rank, reference=self.reference, grad_sync=self.grad_sync))
        stats["learn_seconds"] = time.perf_counter() - t0
        version = step + 1
        stats["version"] = version
        state = self.weights()
        t1 = time.perf_counter()
        stats["digest"] = self.digest(state, version)
        stats["digest_seconds"] = time.perf_counter() - t1
        checkpoint = None
        if self.writes_checkpoint(version):
            t1 = time.perf_counter()
            checkpoint = self.save(version, state)
            if checkpoint is not None:
                stats.update(checkpoint=str(checkpoint), checkpoint_seconds=time.perf_counter() - t1)
        return LearnerStep(stats, state, checkpoint)

    def save(self, version: int, state: dict[str, Tensor]) -> Path | None:
        """Checkpoint ``version`` (rank 0 writes and returns the folder; under FSDP every rank joins the gathers of
        the fp32 weights and the optimizer: ``state``, what was published, is in the rollout's dtype)."""
        full_optim = full_optimizer_state(self.policy.transformer, self.optimizer) if self.sharded else None
        # the published state is in the rollout dtype: the checkpoint gathers the fp32 masters itself
        full_state = full_model_state(self.policy.transformer, self.sync_keys) if self.sharded else None
        if self.rank != 0:
            return None
        run_state = {"weight_version": version, "seed": self.cfg.seed, "config_hash": config_hash(self.cfg),
                     "mode": self.cfg.cluster.mode}
        return save_checkpoint(Path(self.cfg.output.dir), version, self.policy, self.optimizer, run_state,
                               keep=self.cfg.output.keep_checkpoints,
                               policy_state=full_state, optimizer_state=full_optim)
