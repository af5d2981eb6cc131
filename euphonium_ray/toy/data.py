"""Synthetic videos of the shapes world: one coloured shape moving in a straight line on a black background.

Every video is a deterministic function of its caption and a seed: the seed draws the shape's size, speed and
start position; the caption fixes colour, shape and direction. Rendering is an anti-aliased signed-distance fill
(coverage ``α = clamp(0.5 − d, 0, 1)`` for the signed distance d in pixels), vectorised over the batch so the same
code feeds the CPU tests and the GPU pretraining.

Shapes share one size parameter r, the radius of the circle of equal area: a circle of radius r, an axis-aligned
square of half-side ``r·√π/2`` and an equilateral triangle pointing up with circumradius ``r·√(4π/(3√3))``,
centred on its centroid. Equal areas let the ORM read r from the area without knowing the shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from euphonium_ray.config import ToyConfig
from euphonium_ray.toy.vocab import (
    BACKGROUND_RGB,
    COLOR_RGB,
    DIRECTION_XY,
    SHAPES,
    Attributes,
    check_world_words,
    parse_caption,
    prompt_set,
)

SQUARE_HALF_SIDE = math.sqrt(math.pi) / 2  # × r
TRIANGLE_CIRCUMRADIUS = math.sqrt(4 * math.pi / (3 * math.sqrt(3)))  # × r
# Extent of each shape from its centre, in units of r: (left, right, up, down).
SHAPE_EXTENTS: dict[str, tuple[float, float, float, float]] = {
    "circle": (1.0, 1.0, 1.0, 1.0),
    "square": (SQUARE_HALF_SIDE,) * 4,
    "triangle": (
        TRIANGLE_CIRCUMRADIUS * math.sqrt(3) / 2,
        TRIANGLE_CIRCUMRADIUS * math.sqrt(3) / 2,
        TRIANGLE_CIRCUMRADIUS,
        TRIANGLE_CIRCUMRADIUS / 2,
    ),
}
EDGE_MARGIN = 0.5  # pixels between a shape's outline and the frame border (border pixels at most half covered)


@dataclass
class MotionParams:
    """Per-video draws: radius r (B,), speed in px/frame (B,), centre at frame 0 (B, 2) as (x, y) pixels."""

    radius: Tensor
    speed: Tensor
    start: Tensor


def signed_distance(shape_index: Tensor, centers: Tensor, radius: Tensor, size: int) -> Tensor:
    """Signed distance in pixels (negative inside) for shape ids (B,), centres (B, F, 2), radii (B,): (B, F, H, W).

    Circle: exact. Square: Chebyshev distance (exact along the edges, which is what anti-aliasing needs).
    Triangle: the maximum of the three edge half-plane distances (exact inside and near the edges).
    """
    device, dtype = centers.device, centers.dtype
    coords = torch.arange(size, device=device, dtype=dtype) + 0.5
    px = coords.view(1, 1, 1, size) - centers[..., 0, None, None]
    py = coords.view(1, 1, size, 1) - centers[..., 1, None, None]
    r = radius.view(-1, 1, 1, 1).to(dtype)
    circle = torch.sqrt(px * px + py * py) - r
    square = torch.maximum(px.abs(), py.abs()) - SQUARE_HALF_SIDE * r
    inradius = TRIANGLE_CIRCUMRADIUS * r / 2
    sin60 = math.sqrt(3) / 2
    triangle = torch.maximum(py, torch.maximum(-sin60 * px - 0.5 * py, sin60 * px - 0.5 * py)) - inradius
    sid = shape_index.view(-1, 1, 1, 1)
    return torch.where(sid == 0, circle, torch.where(sid == 1, square, triangle))


def coverage(distance: Tensor) -> Tensor:
    """Anti-aliased coverage α ∈ [0, 1] of a pixel from the signed distance of its centre."""
    return (0.5 - distance).clamp(0.0, 1.0)


def compose(alpha: Tensor, rgb: Tensor) -> Tensor:
    """Pixels ``bg + α·(colour − bg)`` for α (B, F, H, W) and colours (B, 3): videos (B, 3, F, H, W)."""
    bg = torch.tensor(BACKGROUND_RGB, device=alpha.device, dtype=alpha.dtype).view(1, 3, 1, 1, 1)
    return bg + alpha[:, None] * (rgb.view(-1, 3, 1, 1, 1).to(alpha.dtype) - bg)


class ShapesWorld:
    """The world a ToyConfig describes: its prompts and a deterministic video generator."""

    def __init__(self, cfg: ToyConfig) -> None:
        check_world_words(cfg.shapes, cfg.colors, cfg.directions)
        self.cfg = cfg
        self.frames, self.size = cfg.frames, cfg.size
        self.prompts: list[str] = prompt_set(cfg.shapes, cfg.colors, cfg.directions, cfg.num_prompts, cfg.seed)
        self.attributes: list[Attributes] = [self.parse(p) for p in self.prompts]
        self._check_fits()

    # ---------------------------------------------------------------------------------------------- words
    def parse(self, caption: str) -> Attributes:
        return parse_caption(caption, self.cfg.shapes, self.cfg.colors, self.cfg.directions)

    def _check_fits(self) -> None:
        """The largest shape moving at the slowest speed must fit its whole path inside the frame."""
        r = self.cfg.radius[1] * self.size
        travel = self.cfg.speed[0] * self.size * (self.frames - 1)
        for shape in self.cfg.shapes:
            left, right, up, down = SHAPE_EXTENTS[shape]
            room = self.size - 2 * EDGE_MARGIN - r * max(left + right, up + down)
            if room < travel:
                raise ValueError(
                    f"toy world does not fit: a {shape} of radius {r:.1f}px travelling {travel:.1f}px over "
                    f"{self.frames} frames leaves the {self.size}px frame; lower toy.radius or toy.speed or raise toy.size"
                )

    # ----------------------------------------------------------------------------------------- sampling
    def sample_motion(self, attrs: list[Attributes], generator: torch.Generator) -> MotionParams:
        """Draw radius, speed and a start position that keeps the whole path inside the frame (CPU, fp64 draws)."""
        n, s, f = len(attrs), self.size, self.frames
        u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
        (r_lo, r_hi), (v_lo, v_hi) = self.cfg.radius, self.cfg.speed
        radius = (r_lo + (r_hi - r_lo) * u[:, 0]) * s
        speed = (v_lo + (v_hi - v_lo) * u[:, 1]) * s
        ext = torch.tensor([SHAPE_EXTENTS[a.shape] for a in attrs], dtype=torch.float64) * radius[:, None]
        d = torch.tensor([DIRECTION_XY[a.direction] for a in attrs], dtype=torch.float64)
        lo = ext[:, [0, 2]] + EDGE_MARGIN  # (x, y) lowest centre
        hi = s - ext[:, [1, 3]] - EDGE_MARGIN
        room = ((hi - lo) * d.abs()).sum(dim=1)
        speed = torch.minimum(speed, room / (f - 1))  # a large shape moves a little slower, never out of frame
        travel = d * (speed * (f - 1))[:, None]
        low = lo - travel.clamp(max=0)
        high = hi - travel.clamp(min=0)
        start = low + (high - low) * u[:, 2:]
        return MotionParams(radius=radius, speed=speed, start=start)

    def render(self, attrs: list[Attributes], motion: MotionParams, device: torch.device | str = "cpu") -> Tensor:
        """Videos (B, 3, F, H, W) in [-1, 1], fp32 on ``device``."""
        shape_index = torch.tensor([SHAPES.index(a.shape) for a in attrs], device=device)
        rgb = torch.tensor([COLOR_RGB[a.color] for a in attrs], device=device, dtype=torch.float32)
        dirs = torch.tensor([DIRECTION_XY[a.direction] for a in attrs], dtype=torch.float64)
        steps = torch.arange(self.frames, dtype=torch.float64)
        centers = motion.start[:, None, :] + steps[None, :, None] * (motion.speed[:, None, None] * dirs[:, None, :])
        dist = signed_distance(shape_index, centers.to(device, torch.float32), motion.radius.to(device), self.size)
        return compose(coverage(dist), rgb)

    def videos(self, captions: list[str], seed: int, device: torch.device | str = "cpu") -> Tensor:
        """Deterministic videos for ``captions``: the same captions and seed give the same pixels."""
        attrs = [self.parse(c) for c in captions]
        gen = torch.Generator().manual_seed(int(seed))
        return self.render(attrs, self.sample_motion(attrs, gen), device)

    def batch(
        self, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor]:
        """A training batch: videos (B, 3, F, H, W) and the prompt indices (B,) they illustrate."""
        idx = torch.randint(len(self.prompts), (batch_size,), generator=generator)
        attrs = [self.attributes[int(i)] for i in idx]
        return self.render(attrs, self.sample_motion(attrs, generator), device), idx
