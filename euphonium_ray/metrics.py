"""``ray.util.metrics`` objects built from the one catalog (``metrics_catalog.METRICS``).

Ray exports them through each node's metrics agent in Prometheus text format (names gain a ``ray_`` prefix,
counters a ``_total`` suffix), so they show in the Ray dashboard and any Prometheus that scrapes the node.
Unknown names fail loudly: a metric that is not in the catalog would be missing from the docs and dashboards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from euphonium_ray.metrics_catalog import BY_NAME, MetricSpec

__all__ = ["RayMetrics", "StepRecorder", "metrics_endpoint", "rss_bytes", "scrape_metrics"]


class RayMetrics:
    """Emit catalog metrics from one process; ``role`` fills a ``role`` tag wherever the spec has one."""

    def __init__(self, role: str = "driver") -> None:
        from ray.util import metrics as ray_metrics

        self.role = role
        self._objects: dict[str, Any] = {}
        for spec in BY_NAME.values():
            kwargs: dict[str, Any] = {"description": spec.description, "tag_keys": spec.tags}
            if spec.kind == "gauge":
                obj = ray_metrics.Gauge(spec.name, **kwargs)
            elif spec.kind == "counter":
                obj = ray_metrics.Counter(spec.name, **kwargs)
            else:
                obj = ray_metrics.Histogram(spec.name, boundaries=list(spec.boundaries), **kwargs)
            self._objects[spec.name] = obj

    def _spec(self, name: str) -> MetricSpec:
        if name not in BY_NAME:
            raise KeyError(f"metric {name!r} is not in metrics_catalog.METRICS")
        return BY_NAME[name]

    def _tags(self, spec: MetricSpec, tags: dict[str, str] | None) -> dict[str, str]:
        out = {k: str(v) for k, v in (tags or {}).items()}
        if "role" in spec.tags:
            out.setdefault("role", self.role)
        missing = [t for t in spec.tags if t not in out]
        if missing:
            raise ValueError(f"metric {spec.name} needs tags {missing}")
        return {k: out[k] for k in spec.tags}

    def record(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        """Set a gauge, add to a counter, or observe a histogram value, by the catalog's kind."""
        spec = self._spec(name)
        obj = self._objects[name]
        t = self._tags(spec, tags)
        if spec.kind == "gauge":
            obj.set(float(value), tags=t)
        elif spec.kind == "counter":
            if value > 0:
                obj.inc(float(value), tags=t)
        else:
            obj.observe(float(value), tags=t)


def metrics_endpoint(node: dict[str, Any] | None = None) -> str:
    """``http://host:port/metrics`` of a node's metrics agent (this node's by default), from ``ray.nodes()``."""
    import ray

    if node is None:
        here = ray.get_runtime_context().get_node_id()
        node = next(n for n in ray.nodes() if n["NodeID"] == here)
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def scrape_metrics(url: str, timeout_s: float = 5.0) -> str:
    """The Prometheus text exposition at ``url``."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - a Ray node's own endpoint
        return resp.read().decode()


# ------------------------------------------------------------------------------------------ step records
def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 where unavailable)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _nan_stats(values: Any) -> tuple[float, float]:
    import torch

    t = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    t = t[torch.isfinite(t)]
    if t.numel() == 0:
        return float("nan"), float("nan")
    return float(t.mean()), float(t.std()) if t.numel() > 1 else 0.0


class StepRecorder:
    """Turns a finished step (rollouts, advantages, learner statistics, timings) into the same numbers for
    TensorBoard/JSONL (through ``RunLogger``) and for Prometheus (through ``RayMetrics``), and keeps a history."""

    PHASES = ("rollout", "reward", "advantage", "learn", "broadcast")

    def __init__(self, cfg: Any, logger: Any, metrics: RayMetrics | None, backend: str = "object_store") -> None:
        self.cfg, self.logger, self.metrics, self.backend = cfg, logger, metrics, backend
        self.history: list[dict[str, Any]] = []
        self.eval_history: list[tuple[int, float]] = []
        self.sample_paths: list[str] = []

    def _emit(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        import math

        if self.metrics is not None and value is not None and math.isfinite(float(value)):
            self.metrics.record(name, float(value), tags)

    def record(self, batch: Any, adv: Any, stats: dict[str, Any]) -> dict[str, Any]:
        traj, step = batch.traj, batch.step
        orm_mean, orm_std = _nan_stats(batch.orm)
        latent_mean = _nan_stats(batch.latent)[0] if batch.latent is not None else float("nan")
        skipped = len(adv.skipped_groups) * traj.group_size
        s: dict[str, float] = {"reward/orm_mean": orm_mean, "reward/orm_std": orm_std,
                               "reward/prm_latent_mean": latent_mean, "samples/skipped": float(skipped)}
        evaluated = traj.process_evaluated
        for k in range(traj.num_steps):
            if bool(evaluated[:, k].any()):
                s[f"reward/process_step_{k}"] = _nan_stats(traj.process_rewards[evaluated[:, k], k])[0]
        if bool(evaluated.any()):
            s["rollout/guidance_grad_norm"] = _nan_stats(traj.guidance_norms[evaluated])[0]
        for key in ("loss", "policy_loss", "clip_fraction", "ratio_mean", "ratio_min", "ratio_max",
                    "first_ratio_min", "first_ratio_max", "kl", "distill_loss", "grad_norm", "approx_kl",
                    "num_transitions", "num_updates", "learn_seconds", "batch_fetch_seconds", "digest_seconds",
                    "gpu_max_allocated_bytes",
                    "gpu_max_reserved_bytes"):
            if key in stats:
                s[f"learner/{key}"] = float(stats[key])
        for key, value in batch.timings.items():
            s[f"time/{key}"] = float(value)
        version = int(stats.get("version", step + 1))
        s["weights/version"] = float(version)
        s["weights/version_lag"] = float(step - batch.version)
        publish = stats.get("publish") or {}
        s["weights/sync_bytes"] = float(publish.get("bytes", float("nan")))
        s["weights/publish_seconds"] = float(publish.get("seconds", float("nan")))
        self.logger.step(step, s, rewards={
            "orm": batch.orm, "latent_outcome": batch.latent, "prompt_indices": traj.prompt_indices,
            "captions": traj.captions, "weight_version": batch.version,
            "skipped_groups": {str(k): v for k, v in adv.skipped_groups.items()},
        })
        for group, reason in adv.skipped_groups.items():
            self.logger.warning(f"step {step}: group {group} skipped ({reason})")
        self._metrics(s, traj, adv, stats, skipped)
        entry = {"step": step, "scalars": s, "digest": stats.get("digest"), "checkpoint": stats.get("checkpoint"),
                 "sample_version": batch.version}
        self.history.append(entry)
        return entry

    def _metrics(self, s: dict[str, float], traj: Any, adv: Any, stats: dict[str, Any], skipped: int) -> None:
        mode = {"mode": "rollout"}
        self._emit("euphonium_reward_orm_mean", s["reward/orm_mean"], mode)
        self._emit("euphonium_reward_orm_std", s["reward/orm_std"], mode)
        self._emit("euphonium_reward_prm_mean", s["reward/prm_latent_mean"], mode)
        for key, value in s.items():
            if key.startswith("reward/process_step_"):
                self._emit("euphonium_process_reward", value, {"sde_step": key.rsplit("_", 1)[1]})
        for name in ("loss", "policy_loss", "clip_fraction", "ratio_mean", "kl", "distill_loss", "grad_norm"):
            if f"learner/{name}" in s:
                self._emit(f"euphonium_{name}", s[f"learner/{name}"])
        if "rollout/guidance_grad_norm" in s:
            self._emit("euphonium_guidance_grad_norm", s["rollout/guidance_grad_norm"])
        for phase in self.PHASES:
            if f"time/{phase}" in s:
                self._emit("euphonium_phase_seconds", s[f"time/{phase}"], {"phase": phase})
        self._emit("euphonium_step_seconds", s.get("time/step", float("nan")))
        # euphonium_videos_total, euphonium_gpu_memory_bytes{role=rollout}: emitted by the rollout workers
        self._emit("euphonium_rss_bytes", float(rss_bytes()), {"role": "driver"})
        self._emit("euphonium_transitions_total", s.get("learner/num_transitions", 0.0))
        self._emit("euphonium_steps_total", 1.0)
        if skipped:
            self._emit("euphonium_skipped_samples_total", float(skipped), {"reason": "non_finite_reward"})
        self._emit("euphonium_weight_sync_seconds", s.get("time/broadcast", float("nan")), {"backend": self.backend})
        self._emit("euphonium_weight_sync_bytes", s["weights/sync_bytes"], {"backend": self.backend})
        self._emit("euphonium_weight_version", s["weights/version"], {"role": "learner"})
        self._emit("euphonium_version_lag", s["weights/version_lag"])

    def videos(self, step: int, videos: Any) -> str:
        path = str(self.logger.video(step, videos))
        self.sample_paths.append(path)
        return path

    def eval(self, step: int, value: float, record: bool = True) -> None:
        """The ODE evaluation after ``step`` (``step`` −1 / start−1: before training); ``record=False`` keeps it
        for the curve only (the metric and TensorBoard get the evaluations made during training)."""
        self.eval_history.append((step, value))
        if not record:
            return
        self._emit("euphonium_eval_reward_orm", value)
        if self.logger.writer is not None:
            self.logger.writer.add_scalar("eval/orm_ode", value, step)

    def reward_curve_png(self, path: Path) -> Path | None:
        """The rollouts' reward per step and the ODE evaluations, in one PNG beside the TensorBoard logs."""
        if not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h["step"] for h in self.history]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, [h["scalars"]["reward/orm_mean"] for h in self.history], label="rollouts (guided SDE), mean")
        if self.eval_history:
            ax.plot([s + 1 for s, _ in self.eval_history], [v for _, v in self.eval_history], "o-",
                    label="unguided ODE samples, evaluation prompts")
        ax.set_xlabel("training step")
        ax.set_ylabel("ORM reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def summary(self, before: Any, after: Any, start: int) -> dict[str, Any]:
        """The closing lines of a run. ``before``/``after``: per-sample ODE rewards from the same noises (paired), or
        None when the run did not evaluate."""
        import math

        import torch

        root = self.logger.root
        b = float(torch.as_tensor(before).nanmean()) if before is not None else float("nan")
        a = float(torch.as_tensor(after).nanmean()) if after is not None else float("nan")
        gain_line = f"  ORM reward of unguided ODE samples: before {b:.4f} -> after {a:.4f}"
        spread: dict[str, float] = {}
        if before is not None and after is not None:
            diff = (torch.as_tensor(after) - torch.as_tensor(before)).double()
            diff = diff[torch.isfinite(diff)]
            if diff.numel() > 1:
                se = float(diff.std()) / math.sqrt(diff.numel())
                spread = {"gain": float(diff.mean()), "gain_se": se, "gain_sample_std": float(diff.std()),
                          "samples": int(diff.numel())}
                gain_line += (f": gain {spread['gain']:+.4f} ± {1.96 * se:.4f} (95% interval over {diff.numel()} "
                              f"paired samples; per-sample spread ± {spread['gain_sample_std']:.4f})")
        curve = self.reward_curve_png(root / "reward_curve.png")
        orm = [h["scalars"]["reward/orm_mean"] for h in self.history]
        k = max(1, min(5, len(orm) // 3)) if orm else 0
        first = sum(orm[:k]) / k if k else float("nan")
        last = sum(orm[-k:]) / k if k else float("nan")
        times = {p: sum(h["scalars"].get(f"time/{p}", 0.0) for h in self.history) / max(1, len(self.history))
                 for p in (*self.PHASES, "step")}
        text = "\n".join([
            f"done: steps {start}..{start + len(self.history)} under {root}",
            f"  curves:      {root / 'tensorboard'}  (tensorboard --logdir {root / 'tensorboard'})",
            f"  logs:        {root / 'logs'}",
            f"  checkpoints: {root / 'checkpoints'}",
            f"  videos:      {root / 'samples'}",
            gain_line,
            f"  ORM reward of the rollouts: first {k} steps {first:.4f} -> last {k} steps {last:.4f}",
            *([f"  reward curve: {curve}"] if curve else []),
            "  mean seconds per step: " + ", ".join(f"{p} {v:.2f}" for p, v in times.items()),
        ])
        return {"text": text, "orm_eval_before": b, "orm_eval_after": a, "eval_gain": spread, "rollout_orm": orm,
                "rollout_orm_first": first, "rollout_orm_last": last, "mean_seconds": times,
                "history": self.history, "eval_history": self.eval_history, "samples": self.sample_paths,
                "output_dir": str(root)}
