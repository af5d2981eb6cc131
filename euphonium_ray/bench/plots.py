"""PNG plots of the convergence benchmark: reward vs step and reward vs seconds, one line per method, mean over
seeds with a min-max band. Each figure has two panels: the (smoothed) ORM reward of the training rollouts and the
ORM reward of unguided ODE samples on the held-out prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from euphonium_ray.bench.analysis import RunLog

__all__ = ["plot_convergence"]


def _band(xs: list[np.ndarray], ys: list[np.ndarray], on_grid: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean/min/max over seeds; with ``on_grid`` each seed's curve is interpolated onto a common x grid (seconds
    differ per seed), up to the shortest seed's last x."""
    if on_grid:
        hi = min(float(x[-1]) for x in xs)
        lo = max(float(x[0]) for x in xs)
        grid = np.linspace(lo, hi, 200) if hi > lo else np.array([lo])
        stack = np.stack([np.interp(grid, x, y) for x, y in zip(xs, ys)])
    else:
        n = min(len(y) for y in ys)
        grid = xs[0][:n]
        stack = np.stack([y[:n] for y in ys])
    return grid, stack.mean(0), stack.min(0), stack.max(0)


def _series(log: RunLog, panel: str, axis: str, smoothing: int) -> tuple[np.ndarray, np.ndarray]:
    if panel == "train":
        y = np.array(log.train_curve(smoothing))
        x = np.array([s["step"] for s in log.steps], float) if axis == "step" else np.array(log.seconds_before())
    else:
        y = np.array([e["heldout_reward"] for e in log.evals])
        x = np.array([e["step" if axis == "step" else "cum_seconds"] for e in log.evals], float)
    return x, y


def plot_convergence(logs: list[RunLog], out_dir: str | Path, smoothing: int, title: str = "", prefix: str = "",
                     target: float | None = None) -> list[Path]:
    """Write ``{prefix}reward_vs_step.png`` and ``{prefix}reward_vs_seconds.png`` (the held-out panel with the claim's
    target as a dashed line when given); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods: dict[str, list[RunLog]] = {}
    for log in logs:
        methods.setdefault(log.method, []).append(log)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for axis, name, xlabel in (("step", "reward_vs_step.png", "training step"),
                               ("seconds", "reward_vs_seconds.png", "training wall-clock seconds")):
        fig, panels = plt.subplots(1, 2, figsize=(13, 4.8))
        for ax, panel, ylabel in (
            (panels[0], "train", f"task reward, training rollouts (moving avg {smoothing})"),
            (panels[1], "heldout", "task reward, held-out unguided ODE samples"),
        ):
            for method, runs in methods.items():
                series = [_series(r, panel, axis, smoothing) for r in runs]
                series = [(x, y) for x, y in series if len(x)]
                if not series:
                    continue
                grid, mean, lo, hi = _band([x for x, _ in series], [y for _, y in series], on_grid=axis == "seconds")
                line = ax.plot(grid, mean, label=f"{method} (n={len(series)})", marker="o" if len(grid) < 12 else None,
                               ms=3)[0]
                ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
            if panel == "heldout" and target is not None:
                ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target (protocol)")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        panels[1].legend(fontsize=8, loc="best")
        fig.suptitle(title or "convergence on the toy world: mean over seeds, band = min-max")
        fig.tight_layout()
        path = out / f"{prefix}{name}"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
