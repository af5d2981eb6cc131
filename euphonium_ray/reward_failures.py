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

__all__ = ["FailureNotes", "NoTrainableGroupError", "NoTrainableGroupGuard", "score_isolating_failures"]

ScoreFn = Callable[[Tensor, list[str]], Tensor]
OnFailure = Callable[[int, str, BaseException], None]


def score_isolating_failures(score: ScoreFn, videos: Tensor, captions: Sequence[str], on_failure: OnFailure) -> Tensor:
    """Scores (B,) fp32 on the CPU; NaN for each video whose own scoring raises, reported as
    ``on_failure(index, caption, exception)``. A batch that scores in one call costs one call."""
    captions = list(captions)
    try:
        return score(videos, captions).float().cpu().reshape(-1)
    except Exception as exc:  # noqa: BLE001 - which video is at fault is found below, one at a time
        if videos.shape[0] == 1:  # a batch of one: its failure is the video's
            on_failure(0, captions[0], exc)
            return torch.full((1,), float("nan"))
    return torch.stack([_score_one(score, videos[i:i + 1], captions[i:i + 1], i, on_failure)
                        for i in range(videos.shape[0])])


def _score_one(score: ScoreFn, video: Tensor, caption: list[str], index: int, on_failure: OnFailure) -> Tensor:
    try:
        return score(video, caption).float().cpu().reshape(-1)[0]
    except Exception as exc:  # noqa: BLE001 - the scorer's own error, reported with the video it failed on
        on_failure(index, caption[0], exc)
        return torch.tensor(float("nan"))


class FailureNotes:
    """The ``on_failure`` of a scorer actor: counts failures, logs each as a warning and keeps one line per failure
    until ``take`` hands them to the driver."""

    def __init__(self, who: str, log: logging.Logger) -> None:
        self.who, self.log = who, log
        self.count = 0
        self.notes: list[str] = []

    def __call__(self, index: int, caption: str, exc: BaseException) -> None:
        self.count += 1
        error = (str(exc).strip().splitlines() or [""])[-1]
        note = f"{self.who} failed on the video of {caption!r} ({type(exc).__name__}: {error}); its reward is NaN"
        self.notes.append(note)
        self.log.warning(note)

    def take(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes


class NoTrainableGroupError(RuntimeError):
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
