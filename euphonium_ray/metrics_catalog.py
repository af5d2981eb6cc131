"""The one table of ``euphonium_*`` metrics.

The driver and actors emit exactly these (``metrics.py`` builds ``ray.util.metrics`` objects from this table),
the docs table and the Grafana dashboard are generated from it, so names cannot drift between them.
Ray exports application metrics with a ``ray_`` prefix; Counters gain ``_total``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MetricKind = Literal["gauge", "counter", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: MetricKind
    description: str
    tags: tuple[str, ...] = ()
    unit: str = ""
    panel: str = ""  # dashboard row it belongs to
    boundaries: tuple[float, ...] = ()  # histograms only

    @property
    def exported_name(self) -> str:
        """The name Prometheus sees (Ray prefixes application metrics with ``ray_``)."""
        suffix = "_total" if self.kind == "counter" and not self.name.endswith("_total") else ""
        return f"ray_{self.name}{suffix}"


TIME_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

METRICS: tuple[MetricSpec, ...] = (
    # rewards
    MetricSpec("euphonium_reward_orm_mean", "gauge", "Mean pixel ORM reward of the step's rollouts", ("mode",), "", "rewards"),
    MetricSpec("euphonium_reward_orm_std", "gauge", "Std of the ORM reward over the step's rollouts", ("mode",), "", "rewards"),
    MetricSpec("euphonium_reward_prm_mean", "gauge", "Mean latent PRM score of the final predicted x0 (latent outcome)", ("mode",), "", "rewards"),
    MetricSpec("euphonium_process_reward", "gauge", "Mean PRM process reward at a sampling step", ("sde_step",), "", "rewards"),
    MetricSpec("euphonium_eval_reward_orm", "gauge", "ORM reward of unguided ODE samples on held-out prompts", (), "", "rewards"),
    # learner
    MetricSpec("euphonium_loss", "gauge", "Total learner loss of the step", (), "", "learner"),
    MetricSpec("euphonium_policy_loss", "gauge", "Clipped GRPO policy loss", (), "", "learner"),
    MetricSpec("euphonium_clip_fraction", "gauge", "Fraction of importance ratios outside the clip range", (), "", "learner"),
    MetricSpec("euphonium_ratio_mean", "gauge", "Mean importance ratio exp(logp_new - logp_old)", (), "", "learner"),
    MetricSpec("euphonium_kl", "gauge", "KL to the frozen reference (0 when off)", (), "", "learner"),
    MetricSpec("euphonium_distill_loss", "gauge", "Distillation loss (0 when off)", (), "", "learner"),
    MetricSpec("euphonium_grad_norm", "gauge", "Gradient norm before clipping", (), "", "learner"),
    MetricSpec("euphonium_guidance_grad_norm", "gauge", "Mean per-sample norm of the PRM gradient used by RGG", (), "", "rollout"),
    # time and throughput
    MetricSpec("euphonium_phase_seconds", "histogram", "Seconds spent in a phase of a training step", ("phase",), "s", "time", TIME_BUCKETS),
    MetricSpec("euphonium_step_seconds", "gauge", "Wall-clock seconds of the last training step", (), "s", "time"),
    MetricSpec("euphonium_videos_total", "counter", "Videos sampled by rollout workers", ("role",), "", "throughput"),
    MetricSpec("euphonium_transitions_total", "counter", "SDE transitions trained on by the learner", (), "", "throughput"),
    MetricSpec("euphonium_steps_total", "counter", "Training steps completed", (), "", "throughput"),
    MetricSpec("euphonium_skipped_samples_total", "counter", "Samples dropped for a non-finite reward", ("reason",), "", "throughput"),
    # weights
    MetricSpec("euphonium_weight_sync_seconds", "gauge", "Seconds to broadcast the policy to the rollout workers", ("backend",), "s", "weights"),
    MetricSpec("euphonium_weight_sync_bytes", "gauge", "Bytes moved by the last weight broadcast", ("backend",), "bytes", "weights"),
    MetricSpec("euphonium_weight_version", "gauge", "Weight version held by an actor", ("role",), "", "weights"),
    MetricSpec("euphonium_version_lag", "gauge", "Learner version minus the version rollouts were sampled with", (), "", "weights"),
    # memory
    MetricSpec("euphonium_gpu_memory_bytes", "gauge", "Peak GPU memory allocated by an actor (0 on CPU)", ("role",), "bytes", "memory"),
    MetricSpec("euphonium_rss_bytes", "gauge", "Resident memory of an actor process", ("role",), "bytes", "memory"),
)

BY_NAME: dict[str, MetricSpec] = {m.name: m for m in METRICS}


def markdown_table() -> str:
    rows = ["| name (as exported) | type | tags | meaning |", "|---|---|---|---|"]
    for m in METRICS:
        tags = ", ".join(m.tags) or "-"
        rows.append(f"| `{m.exported_name}` | {m.kind} | {tags} | {m.description} |")
    return "\n".join(rows)
