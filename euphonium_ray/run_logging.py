"""What a training run leaves on disk and on the terminal: TensorBoard scalars, JSONL logs, a text log,
sample GIFs, and a progress bar with reward, step time and ETA.

Layout under ``output.dir``: ``tensorboard/``, ``logs/train.log``, ``logs/ray.log`` (what Ray's workers print, see
``ray_output.py``), ``logs/steps.jsonl`` (every scalar of a step),
``logs/rewards.jsonl`` (per-sample rewards of a step), ``samples/step-N.gif``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from euphonium_ray.files import write_atomic

__all__ = ["RunLogger", "write_video_gif"]


def write_video_gif(videos: Tensor, path: str | Path, columns: int = 8, scale: int = 4, ms_per_frame: int = 180) -> Path:
    """A grid GIF of videos (B, 3, F, H, W) in [-1, 1]: one tile per video, one GIF frame per video frame."""
    from PIL import Image

    v = ((videos.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    b, _, f, h, w = v.shape
    cols = max(1, min(columns, b))
    rows = math.ceil(b / cols)
    frames = []
    for t in range(f):
        canvas = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, 3), dtype=np.uint8)
        for i in range(b):
            r, c = divmod(i, cols)
            canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = (
                v[i, :, t].permute(1, 2, 0).numpy()
            )
        img = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
        frames.append(img)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)
    tmp.replace(out)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _drop_records_from(path: Path, step: int) -> None:
    """Keep the JSONL records of ``path`` before ``step`` (rewritten atomically; a missing file stays missing)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.strip() or json.loads(line).get("step", -1) < step]
    if len(kept) != len(lines):
        write_atomic(path, "".join(kept))


class RunLogger:
    """The driver's logging sink; ``progress=False`` keeps the terminal quiet (tests, ``ray job`` logs)."""

    def __init__(self, out_dir: str | Path, *, total_steps: int, start_step: int = 0, tensorboard: bool = True,
                 progress: bool = True) -> None:
        self.root = Path(out_dir)
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.samples = self.root / "samples"
        self.log = logging.getLogger(f"euphonium_ray.run.{id(self)}")
        self.log.setLevel(logging.INFO)
        self.log.propagate = False
        handler = logging.FileHandler(self.logs / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.log.addHandler(handler)
        self._handlers: list[logging.Handler] = [handler]
        if start_step > 0:  # a resumed run redoes the steps after its checkpoint: their old records go
            for name in ("steps.jsonl", "rewards.jsonl"):
                _drop_records_from(self.logs / name, start_step)
        if not progress:
            stream = logging.StreamHandler(sys.stderr)
            stream.setFormatter(logging.Formatter("[euphonium] %(message)s"))
            self.log.addHandler(stream)
            self._handlers.append(stream)
        self._on_close: list[Callable[[], None]] = []
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.root / "tensorboard"), purge_step=start_step or None)
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    # ---------------------------------------------------------------------------------------------- text
    def info(self, message: str) -> None:
        self.log.info(message)
        if self.bar is not None:
            self.bar.write(message)

    def warning(self, message: str) -> None:
        self.log.warning(message)
        if self.bar is not None:
            self.bar.write(f"warning: {message}")

    # ------------------------------------------------------------------------------------------- scalars
    def step(self, step: int, scalars: dict[str, float], rewards: dict[str, Any] | None = None) -> None:
        """One finished training step: TensorBoard + ``steps.jsonl`` (+ ``rewards.jsonl``), progress bar."""
        if self.writer is not None:
            for key, value in scalars.items():
                if value is not None and math.isfinite(float(value)):
                    self.writer.add_scalar(key, float(value), step)
            self.writer.flush()
        with open(self.logs / "steps.jsonl", "a") as f:
            f.write(json.dumps(_jsonable({"step": step, **scalars}), allow_nan=False) + "\n")
        if rewards is not None:
            with open(self.logs / "rewards.jsonl", "a") as f:
                f.write(json.dumps(_jsonable({"step": step, **rewards}), allow_nan=False) + "\n")
        summary = (f"step {step}: orm {scalars.get('reward/orm_mean', float('nan')):.4f} "
                   f"loss {scalars.get('learner/loss', float('nan')):.4g} "
                   f"time {scalars.get('time/step', float('nan')):.1f}s")
        self.log.info(summary)
        if self.bar is not None:
            self.bar.set_postfix(orm=f"{scalars.get('reward/orm_mean', float('nan')):.3f}",
                                 step_s=f"{scalars.get('time/step', float('nan')):.1f}")
            self.bar.update(1)

    def video(self, step: int, videos: Tensor, tag: str = "samples") -> Path:
        return write_video_gif(videos, self.samples / f"{tag}-step-{step}.gif")

    def on_close(self, action: Callable[[], None]) -> None:
        """Run ``action`` when the run's logging closes (e.g. give Ray its console back)."""
        self._on_close.append(action)

    def close(self) -> None:
        for action in self._on_close:
            action()
        self._on_close.clear()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        for h in self._handlers:
            self.log.removeHandler(h)
            h.close()
