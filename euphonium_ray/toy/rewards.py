"""The toy world's reward tasks: pixel rewards a small policy can climb, each registered by name (``registry.ORMS``).

* ``toy-caption`` (alias ``toy``): caption faithfulness, the judge of ``orm.py`` (colour, form, size, direction,
  smoothness). The tiny base model sits near its likelihood optimum on it, so RL climbs it slowly.
* ``toy-centered``: a composition preference: the subject framed in the middle of the picture, as aesthetic
  scorers favour centred subjects. Spatial, independent of the caption, and the training data already contain
  centred videos (start positions are uniform), so the policy can climb it by re-mapping noise to position.
* ``toy-motion``: a dynamics preference, in the spirit of VBench's dynamic degree: the subject travels far in the
  direction the caption names. Temporal, tied to the caption's direction, and within the data's range for a
  good part (speeds of the world vary by ±12%, sampled videos travel less than the data).

Both preferences multiply by ``presence`` (the shape covers at least half the smallest shape's area on average), so
an empty or washed-out video cannot score. Each reward is in [0, 1], batched, deterministic, and differentiable in
the pixels (``differentiable_score``), which the toy world's oracle process reward uses (``oracle.py``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from euphonium_ray.config import RunConfig, ToyConfig
from euphonium_ray.toy.orm import ToyPixelORM, check_videos, frame_geometry
from euphonium_ray.toy.vocab import DIRECTION_XY, parse_caption

__all__ = ["CenteredReward", "MotionReward", "caption_reward", "centered_reward", "motion_reward"]


class _ToyPreference:
    """Shared parts of the preference rewards: presence of a shape, and no-grad scoring for the ORM contract."""

    def __init__(self, cfg: ToyConfig, dead_zone: float = 0.1) -> None:
        self.cfg = cfg
        self.size = cfg.size
        self.dead_zone = dead_zone
        # half the area of the smallest shape the world draws (all shapes share the area of the circle of radius r)
        self.min_area = 0.5 * math.pi * (cfg.radius[0] * cfg.size) ** 2

    def presence(self, area: Tensor) -> Tensor:
        return (area.mean(1) / self.min_area).clamp(0.0, 1.0)

    def score(self, videos: Tensor, captions: list[str]) -> Tensor:
        with torch.no_grad():
            return self.differentiable_score(videos, captions)

    def differentiable_score(self, videos: Tensor, captions: list[str]) -> Tensor:
        raise NotImplementedError


class CenteredReward(_ToyPreference):
    """``presence · mean_f exp(−d_f²/(2s²))``, d_f the centroid's distance to the frame centre over the frame size,
    s = ``spread`` (0.15: a subject 3.6 px off-centre in a 24 px frame scores 0.61)."""

    def __init__(self, cfg: ToyConfig, spread: float = 0.15, dead_zone: float = 0.1) -> None:
        super().__init__(cfg, dead_zone)
        self.spread = spread

    def differentiable_score(self, videos: Tensor, captions: list[str]) -> Tensor:
        check_videos(videos, captions)
        geo = frame_geometry(videos, self.dead_zone)
        h = videos.shape[-1]
        d = torch.linalg.vector_norm(geo.centers - h / 2.0, dim=-1) / h  # (B, F)
        return self.presence(geo.area) * torch.exp(-(d**2) / (2 * self.spread**2)).mean(1)


class MotionReward(_ToyPreference):
    """``presence · clamp(travel/target, 0, 1)``: travel is the centroid's net displacement from the first to the
    last frame along the caption's direction (flicker cancels in a net displacement), target = ``target``·size
    (0.5: 12 px in 24 px frames, about twice what the world's videos travel)."""

    def __init__(self, cfg: ToyConfig, target: float = 0.5, dead_zone: float = 0.1) -> None:
        super().__init__(cfg, dead_zone)
        self.target = target

    def differentiable_score(self, videos: Tensor, captions: list[str]) -> Tensor:
        check_videos(videos, captions)
        geo = frame_geometry(videos, self.dead_zone)
        dirs = [DIRECTION_XY[parse_caption(c, self.cfg.shapes, self.cfg.colors, self.cfg.directions).direction]
                for c in captions]
        u = torch.tensor(dirs, device=videos.device, dtype=geo.centers.dtype)
        travel = ((geo.centers[:, -1] - geo.centers[:, 0]) * u).sum(-1)
        return self.presence(geo.area) * (travel / (self.target * self.size)).clamp(0.0, 1.0)


def caption_reward(cfg: RunConfig, device: torch.device | str = "cpu") -> ToyPixelORM:
    """``toy-caption``: the caption-faithfulness judge for the run's toy world."""
    return ToyPixelORM.from_config(cfg.toy)


def centered_reward(cfg: RunConfig, device: torch.device | str = "cpu") -> CenteredReward:
    """``toy-centered``: the composition preference for the run's toy world."""
    return CenteredReward(cfg.toy)


def motion_reward(cfg: RunConfig, device: torch.device | str = "cpu") -> MotionReward:
    """``toy-motion``: the dynamics preference for the run's toy world."""
    return MotionReward(cfg.toy)
