"""Reward failures: one video a scorer cannot judge costs that video, not its batch; a run whose rewards keep
failing stops, instead of finishing with ``loss nan`` and no update.

``score_isolating_failures`` scores a batch in one call and, only when that call raises, again one video at a
time, so the failing video gets NaN (its group is then left out of that step's update by
``learning.compute_advantages``) and every other video keeps its score. ``NoTrainableGroupGuard`` counts the
consecutive steps in which every group was left out and raises ``NoTrainableGroupError`` once there were
``rewards.max_failed_steps`` of them.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from euphonium_ray.errors import EuphoniumError

__all__ = ["FailureNotes", "NoTrainableGroupError", "NoTrainableGroupGuard", "score_isolating_failures"]

ScoreFn = Callable[[Tensor, list[str]], Tensor]
OnFailure = Callable[[int, str, BaseException], None]


def score_isolating_failures(score: ScoreFn, videos: Tensor, captions: Sequence[str], on_failure: OnFailure) -> Tensor:
    """Scores (B,) fp32 on the CPU; NaN for each video whose own scoring raises, reported as
    ``on_failure(index, caption, exception)``. A batch that scores in one call costs one call."""
    captions = list(captions)
    try:
        got = score(videos, captions)
    except Exception as exc:  # noqa: BLE001 - which video is at fault is found below, one at a time
        if videos.shape[0] == 1:  # a batch of one: its failure is the video's
            on_failure(0, captions[0], exc)
            return torch.full((1,), float("nan"))
        return torch.stack([_score_one(score, videos[i:i + 1], captions[i:i + 1], i, on_failure)
                            for i in range(videos.shape[0])])
    return _one_per_video(got, videos.shape[0])


def _one_per_video(scores: Tensor, count: int) -> Tensor:
    """A scorer that returns another number of scores than it got videos is broken, not failing on a video."""
    flat = torch.as_tensor(scores).float().cpu().reshape(-1)
    if flat.numel() != count:
        raise ValueError(f"the outcome reward returned {flat.numel()} scores for {count} videos")
    return flat


def _score_one(score: ScoreFn, video: Tensor, caption: list[str], index: int, on_failure: OnFailure) -> Tensor:
    try:
        got = score(video, caption)
    except Exception as exc:  # noqa: BLE001 - the scorer's own error, reported with the video it failed on
        on_failure(index, caption[0], exc)
        return torch.tensor(float("nan"))
    return _one_per_video(got, 1)[0]


class FailureNotes:
    """The ``on_failure`` of a scorer actor: counts failures, logs each as a warning, and keeps them until ``take``
    hands them to the driver as one line per distinct error (naming the videos' captions), so a scorer that fails
    on every video of a step says so once, not once per video."""

    def __init__(self, who: str, log: logging.Logger) -> None:
        self.who, self.log = who, log
        self.count = 0
        self.failed: list[tuple[str, str]] = []  # (caption, "Type: first line of the message")

    def __call__(self, index: int, caption: str, exc: BaseException) -> None:
        self.count += 1
        error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        self.failed.append((caption, error))
        self.log.warning("%s failed on the video of %r (%s); its reward is NaN", self.who, caption, error)

    def take(self) -> list[str]:
        by_error: dict[str, list[str]] = {}
        for caption, error in self.failed:
            by_error.setdefault(error, []).append(caption)
        self.failed = []
        lines = []
        for error, captions in by_error.items():
            shown = ", ".join(repr(c) for c in captions[:3]) + (f" and {len(captions) - 3} more" if len(captions) > 3
                                                                else "")
            if len(captions) == 1:
                lines.append(f"{self.who} failed on the video of {shown}: {error}; its reward is NaN")
            else:
                lines.append(f"{self.who} failed on {len(captions)} videos ({shown}): {error}; their rewards are NaN")
        return lines


class NoTrainableGroupError(EuphoniumError, RuntimeError):
    """Too many consecutive steps in which no group had finite rewards; the message says which and why."""


class NoTrainableGroupGuard:
    """Call ``check(step, advantages)`` once per step, after the advantages: raises NoTrainableGroupError at the
    ``max_failed_steps``-th consecutive step whose every group was skipped."""

    def __init__(self, max_failed_steps: int, where_errors_are: str = "") -> None:
        self.max_failed_steps = int(max_failed_steps)
        self.where_errors_are = where_errors_are
        self.failed_steps: list[int] = []

    def check(self, step: int, advantages: Any) -> None:
        if advantages.kept_rows.numel():
            self.failed_steps = []
            return
        self.failed_steps.append(step)
        if len(self.failed_steps) < self.max_failed_steps:
            return
        reasons = list(advantages.skipped_groups.values())
        example = f"; at step {step} e.g. {reasons[0]}" if reasons else ""
        see = f"; the scorer's errors are in {self.where_errors_are}" if self.where_errors_are else ""
        raise NoTrainableGroupError(
            f"no trainable group in {len(self.failed_steps)} consecutive steps ({self.failed_steps[0]}.."
            f"{self.failed_steps[-1]}): every group had a non-finite reward{example}; stopped at "
            f"rewards.max_failed_steps={self.max_failed_steps}{see}")
