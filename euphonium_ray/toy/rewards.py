"""The toy world's reward tasks: pixel rewards a small policy can climb, each registered by name (``registry.ORMS``).

* ``toy-caption`` (alias ``toy``): caption faithfulness, the judge of ``orm.py`` (colour, form, size, direction,
  smoothness). The tiny base model sits near its likelihood optimum on it, so RL climbs it slowly.
* ``toy-centered``: a composition preference: the subject framed in the middle of the picture, as aesthetic
  scorers favour centred subjects. Spatial, independent of the caption, and the training data already contain
  centred videos (start positions are uniform), so the policy can climb it by re-mapping noise to position.
* ``toy-motion``: a dynamics preference, in the spirit of VBench's dynamic degree: the subject travels far in the
  direction the caption names. Temporal, tied to the caption's direction, and within the data's range for a
  good part (speeds of the world vary by ±12%, sampled videos travel less than the data).
* ``toy-prominence``: a scale preference: the subject large in the frame, as photographers and aesthetic scorers
  favour a prominent subject. A property of the whole video (area, not where or how it moves), within the data's
  range (the world's radii vary by ±11%; the base policy's spread is wider), so the policy can climb it by
  re-mapping noise to size; the ramp ends a little above the world's largest shape, so inflating a blob pays no
  more.
* ``toy-steady``: a temporal-consistency preference, in the spirit of VBench's subject consistency and temporal
  flickering: the subject keeps its area from frame to frame. The world's videos hold it within 1.5%; the base
  policy's subject flickers (median coefficient of variation 0.047, and some videos lose or gain the shape), so
  there is room to climb without leaving the data.

Centered, motion and steady multiply by ``presence`` (the shape covers at least half the smallest shape's area on average), so
an empty or washed-out video cannot score. Each reward is in [0, 1], batched, deterministic, and differentiable in
the pixels (``differentiable_score``), which the toy world's oracle process reward uses (``oracle.py``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from euphonium_ray.config import RunConfig, ToyConfig
from euphonium_ray.toy.orm import FrameGeometry, ToyPixelORM, check_videos, frame_geometry
from euphonium_ray.toy.vocab import DIRECTION_XY, parse_caption

__all__ = ["CenteredReward", "MotionReward", "ProminenceReward", "SteadyReward", "caption_reward", "centered_reward", "motion_reward",
           "prominence_reward", "steady_reward"]


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
        check_videos(videos, captions)
        return self.score_geometry(frame_geometry(videos, self.dead_zone), videos, captions)

    def score_geometry(self, geo: FrameGeometry, videos: Tensor, captions: list[str]) -> Tensor:
        """The preference from where the subject is in every frame (``frame_geometry``)."""
        raise NotImplementedError


class CenteredReward(_ToyPreference):
    """``presence · mean_f exp(−d_f²/(2s²))``, d_f the centroid's distance to the frame centre over the frame size,
    s = ``spread`` (0.15: a subject 3.6 px off-centre in a 24 px frame scores 0.61)."""

    def __init__(self, cfg: ToyConfig, spread: float = 0.15, dead_zone: float = 0.1) -> None:
        super().__init__(cfg, dead_zone)
        self.spread = spread

    def score_geometry(self, geo: FrameGeometry, videos: Tensor, captions: list[str]) -> Tensor:
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

    def score_geometry(self, geo: FrameGeometry, videos: Tensor, captions: list[str]) -> Tensor:
        dirs = [DIRECTION_XY[parse_caption(c, self.cfg.shapes, self.cfg.colors, self.cfg.directions).direction]
                for c in captions]
        u = torch.tensor(dirs, device=videos.device, dtype=geo.centers.dtype)
        travel = ((geo.centers[:, -1] - geo.centers[:, 0]) * u).sum(-1)
        return self.presence(geo.area) * (travel / (self.target * self.size)).clamp(0.0, 1.0)


class ProminenceReward(_ToyPreference):
    """``clamp((r − lo)/(hi − lo), 0, 1)``, r = sqrt(mean_f area / π)/size the subject's equal-area radius over the
    frame size; lo = r_min − (r_max − r_min) and hi = r_max + (r_max − r_min)/2 from the world's radius range
    (0.12 and 0.22 for (0.16, 0.2)): the world's videos score 0.4-0.8, an empty video 0."""

    def __init__(self, cfg: ToyConfig, dead_zone: float = 0.1) -> None:
        super().__init__(cfg, dead_zone)
        r_min, r_max = cfg.radius
        self.lo = r_min - (r_max - r_min)
        self.hi = r_max + 0.5 * (r_max - r_min)

    def score_geometry(self, geo: FrameGeometry, videos: Tensor, captions: list[str]) -> Tensor:
        radius = torch.sqrt(geo.area.mean(1) / math.pi + 1e-12) / videos.shape[-1]
        return ((radius - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0)


class SteadyReward(_ToyPreference):
    """``presence · exp(−cv²/(2s²))``, cv the coefficient of variation of the subject's area over the frames, s =
    ``spread`` (0.05: the base policy's median video scores about 0.6, the world's videos about 1)."""

    def __init__(self, cfg: ToyConfig, spread: float = 0.05, dead_zone: float = 0.1) -> None:
        super().__init__(cfg, dead_zone)
        self.spread = spread

    def score_geometry(self, geo: FrameGeometry, videos: Tensor, captions: list[str]) -> Tensor:
        mean = geo.area.mean(1)
        cv = geo.area.std(1, correction=0) / (mean + 1e-6)
        return self.presence(geo.area) * torch.exp(-(cv**2) / (2 * self.spread**2))


def caption_reward(cfg: RunConfig, device: torch.device | str = "cpu") -> ToyPixelORM:
    """``toy-caption``: the caption-faithfulness judge for the run's toy world."""
    return ToyPixelORM.from_config(cfg.toy)


def centered_reward(cfg: RunConfig, device: torch.device | str = "cpu") -> CenteredReward:
    """``toy-centered``: the composition preference for the run's toy world."""
    return CenteredReward(cfg.toy)


def motion_reward(cfg: RunConfig, device: torch.device | str = "cpu") -> MotionReward:
    """``toy-motion``: the dynamics preference for the run's toy world."""
    return MotionReward(cfg.toy)


def prominence_reward(cfg: RunConfig, device: torch.device | str = "cpu") -> ProminenceReward:
    """``toy-prominence``: the scale preference for the run's toy world."""
    return ProminenceReward(cfg.toy)


def steady_reward(cfg: RunConfig, device: torch.device | str = "cpu") -> SteadyReward:
    """``toy-steady``: the temporal-consistency preference for the run's toy world."""
    return SteadyReward(cfg.toy)
