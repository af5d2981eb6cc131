"""The toy pixel ORM: a stand-in for a physics/deformity judge, scoring decoded videos against their captions.

Per video (pixels clamped to [-1, 1]; background black; colour c and direction u from the caption, u⊥ its normal):

* a dead zone ``k(α) = clamp((α − δ)/(1 − 2δ), 0, 1)``, δ = ``dead_zone``, so faint noise (a sampler's last
  noise injection, values within 2δ of the background) is not taken for shape and near-full pixels count as full;
* coverage of a pixel (the world renders ``x = bg + α·(c − bg)`` and every colour has a channel at +1, so the
  largest channel recovers α for any colour): ``a = k((max_ch x + 1)/2)``;
* amount of the *caption's* colour: project ``x − bg`` on ``c − bg``: ``t = (x−bg)·(c−bg)/‖c−bg‖²`` with residual
  ``ρ = ‖x − bg − t·(c−bg)‖``; ``m = k(t)·exp(−ρ²/(2τ²))``, τ = ``color_tau``;
* per frame f: area ``A_f = Σ a``, centroid ``p_f = Σ a·xy / A_f``; equal-area radius ``r_f = √(A_f/π)``
  (all shapes of the world have the area of the circle of radius r);
* template ``T_f``: the caption's shape rendered by the world's own renderer at ``p_f`` with radius ``r_f``, through
  the same dead zone k.

Terms, each in [0, 1]:

* colour    ``C = Σ_f Σ m / (Σ_f Σ a + ε)``: the shape is the caption's colour, in every frame;
* form      ``S = mean_f clamp((IoU(a_f, T_f) − i0)/(1 − i0), 0, 1)``, soft IoU ``Σmin/Σmax``, i0 = ``iou_floor``:
  one compact shape of the named kind (fragments, blur, extra blobs and the wrong shape lower it);
* size      ``Z = exp(−std_f(A_f)/mean_f(A_f) / size_tol)``: the shape keeps its size;
* direction ``D = clamp(ū/v, 0, 1)·exp(−(w̄/v)²)``, with per-step displacements ``d_f = p_{f+1} − p_f``,
  ``ū = mean d·u`` (along the caption's direction), ``w̄ = mean d·u⊥`` and v the world's slowest speed (px/frame);
* smooth    ``M = exp(−(std_f(d·u) + std_f(d·u⊥))/v)``: steady motion, no jumps or jitter.

Score ``R = (C + S + S·Z + S·D + S·M)/5`` ∈ [0, 1]. Size, direction and smoothness only count in proportion to
form: a blob of noise has a steady centroid, but nothing in it keeps a shape. Real videos of the world score
about 0.95; the terms are continuous in the pixels (not differentiable through the clamps: fine for an ORM).
Batched and deterministic; ``score_terms`` returns the five terms for diagnostics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from euphonium_ray.config import ToyConfig
from euphonium_ray.toy.data import coverage, signed_distance
from euphonium_ray.toy.vocab import BACKGROUND_RGB, COLOR_RGB, DIRECTION_XY, SHAPES, parse_caption

TERM_NAMES = ("color", "form", "size", "direction", "smooth")


@dataclass
class ORMTerms:
    """The five terms (B,) each, and the score (B,)."""

    color: Tensor
    form: Tensor
    size: Tensor
    direction: Tensor
    smooth: Tensor

    @property
    def score(self) -> Tensor:
        s = self.form
        return (self.color + s + s * self.size + s * self.direction + s * self.smooth) / 5.0

    def as_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in TERM_NAMES} | {"score": self.score}


def check_videos(videos: Tensor, captions: list[str]) -> None:
    """The shapes of what a toy reward scores: videos (B, 3, F≥2, H, W) with finite pixels and B captions."""
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"toy reward expects videos (B, 3, F, H, W), got {tuple(videos.shape)}")
    if len(captions) != videos.shape[0]:
        raise ValueError(f"toy reward got {videos.shape[0]} videos but {len(captions)} captions")
    if videos.shape[2] < 2:
        raise ValueError("toy reward needs at least 2 frames to judge motion")
    if not torch.isfinite(videos).all():
        raise ValueError("toy reward got non-finite pixel values (NaN or inf) in the videos")


def dead_zone(alpha: Tensor, delta: float) -> Tensor:
    """``k(α) = clamp((α − δ)/(1 − 2δ), 0, 1)``: faint noise is background, near-full pixels are full."""
    return ((alpha - delta) / (1 - 2 * delta)).clamp(0.0, 1.0)


@dataclass
class FrameGeometry:
    """Per-pixel coverage (B, F, H, W), covered area per frame (B, F) and centroid per frame (B, F, 2) as (x, y)."""

    coverage: Tensor
    area: Tensor
    centers: Tensor


def frame_geometry(videos: Tensor, delta: float = 0.1) -> FrameGeometry:
    """Where the shape is in every frame: coverage ``a = k((max_ch x + 1)/2)`` (every colour has a channel at +1 on
    the black background), its area and its area-weighted centroid in pixels. Differentiable in the pixels."""
    x = videos.to(torch.promote_types(videos.dtype, torch.float32)).clamp(-1.0, 1.0)  # fp64 stays fp64 (tests)
    h, w = x.shape[-2:]
    a = dead_zone((x.amax(dim=1) + 1.0) / 2.0, delta)
    area = a.sum((2, 3))
    ys = torch.arange(h, device=x.device, dtype=x.dtype) + 0.5
    xs = torch.arange(w, device=x.device, dtype=x.dtype) + 0.5
    cx = (a.sum(2) * xs).sum(-1) / (area + 1e-6)
    cy = (a.sum(3) * ys).sum(-1) / (area + 1e-6)
    return FrameGeometry(a, area, torch.stack([cx, cy], dim=-1))


class ToyPixelORM:
    """OutcomeRewardModel for the shapes world: ``score(videos (B,3,F,H,W) in [-1,1], captions) -> (B,)``."""

    def __init__(
        self,
        min_speed: float,
        shapes: list[str] | tuple[str, ...] = SHAPES,
        colors: list[str] | tuple[str, ...] = tuple(COLOR_RGB),
        directions: list[str] | tuple[str, ...] = tuple(DIRECTION_XY),
        color_tau: float = 0.5,
        iou_floor: float = 0.5,
        size_tol: float = 0.2,
        dead_zone: float = 0.1,
    ) -> None:
        if min_speed <= 0:
            raise ValueError(f"ToyPixelORM: min_speed must be > 0 px/frame, got {min_speed}")
        self.min_speed = float(min_speed)
        self.shapes, self.colors, self.directions = tuple(shapes), tuple(colors), tuple(directions)
        self.color_tau, self.iou_floor, self.size_tol = float(color_tau), float(iou_floor), float(size_tol)
        if not 0 <= dead_zone < 0.5:
            raise ValueError(f"ToyPixelORM: dead_zone must be in [0, 0.5), got {dead_zone}")
        self.dead_zone = float(dead_zone)

    @classmethod
    def from_config(cls, cfg: ToyConfig) -> "ToyPixelORM":
        return cls(min_speed=cfg.speed[0] * cfg.size, shapes=cfg.shapes, colors=cfg.colors, directions=cfg.directions)

    def score(self, videos: Tensor, captions: list[str]) -> Tensor:
        with torch.no_grad():
            return self.score_terms(videos, captions).score

    def differentiable_score(self, videos: Tensor, captions: list[str]) -> Tensor:
        """The same score with autograd through the pixels (zero gradient where a clamp saturates), for the oracle
        process reward of the toy world (``toy/oracle.py``)."""
        return self.score_terms(videos, captions).score

    def score_terms(self, videos: Tensor, captions: list[str]) -> ORMTerms:
        check_videos(videos, captions)
        attrs = [parse_caption(c, self.shapes, self.colors, self.directions) for c in captions]
        x = videos.float().clamp(-1.0, 1.0)
        dev = x.device
        b, _, f, h, w = x.shape
        eps = 1e-6

        bg = torch.tensor(BACKGROUND_RGB, device=dev).view(1, 3, 1, 1, 1)
        col = torch.tensor([COLOR_RGB[a.color] for a in attrs], device=dev).view(b, 3, 1, 1, 1) - bg
        rel = x - bg
        t = (rel * col).sum(1) / (col * col).sum(1)
        resid = ((rel - t[:, None] * col) ** 2).sum(1)
        m = dead_zone(t, self.dead_zone) * torch.exp(-resid / (2 * self.color_tau**2))  # (B, F, H, W)
        geo = frame_geometry(x, self.dead_zone)
        a, area, centers = geo.coverage, geo.area, geo.centers
        color = m.sum((1, 2, 3)) / (a.sum((1, 2, 3)) + eps)

        radius = torch.sqrt(area / math.pi).clamp(0.5, max(h, w) / 2)
        shape_index = torch.tensor([SHAPES.index(a_.shape) for a_ in attrs], device=dev)
        template = dead_zone(coverage(
            signed_distance(shape_index.repeat_interleave(f), centers.reshape(b * f, 1, 2), radius.reshape(-1), h)
        ), self.dead_zone).reshape(b, f, h, w)
        if w != h:
            raise ValueError(f"ToyPixelORM expects square frames, got {h}x{w}")
        iou = torch.minimum(a, template).sum((2, 3)) / (torch.maximum(a, template).sum((2, 3)) + eps)
        form = ((iou - self.iou_floor) / (1 - self.iou_floor)).clamp(0.0, 1.0).mean(1)

        cv = area.std(1) / (area.mean(1) + eps)
        size = torch.exp(-cv / self.size_tol)

        u = torch.tensor([DIRECTION_XY[a_.direction] for a_ in attrs], device=dev, dtype=x.dtype)  # (B, 2)
        u_perp = torch.stack([-u[:, 1], u[:, 0]], dim=-1)
        d = centers[:, 1:] - centers[:, :-1]  # (B, F-1, 2)
        along = (d * u[:, None]).sum(-1)
        across = (d * u_perp[:, None]).sum(-1)
        v = self.min_speed
        direction = (along.mean(1) / v).clamp(0.0, 1.0) * torch.exp(-((across.mean(1) / v) ** 2))
        if f > 2:
            jitter = along.std(1) + across.std(1)
        else:
            jitter = torch.zeros(b, device=dev)
        smooth = torch.exp(-jitter / v)
        return ORMTerms(color=color, form=form, size=size, direction=direction, smooth=smooth)
