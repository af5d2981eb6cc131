"""The shapes world: deterministic videos that show what their captions say, and a caption parser that names bad words."""

from __future__ import annotations

import math

import pytest
import torch

from euphonium_ray.config import ConfigError, ToyConfig, load_config
from euphonium_ray.toy.data import SHAPE_EXTENTS, ShapesWorld, coverage, signed_distance
from euphonium_ray.toy.vocab import CaptionError, parse_caption, prompt_set


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(ToyConfig())


def test_same_seed_gives_identical_pixels_and_another_seed_differs(world: ShapesWorld) -> None:
    caps = world.prompts[:6]
    a, b, c = world.videos(caps, seed=7), world.videos(caps, seed=7), world.videos(caps, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (6, 3, 8, 24, 24) and a.min() >= -1 and a.max() <= 1


def test_prompts_cover_every_combination_and_a_subset_is_seeded() -> None:
    cfg = ToyConfig()
    assert len(ShapesWorld(cfg).prompts) == 3 * 4 * 4 == len(set(ShapesWorld(cfg).prompts))
    sub_a = prompt_set(cfg.shapes, cfg.colors, cfg.directions, 10, seed=1)
    assert sub_a == prompt_set(cfg.shapes, cfg.colors, cfg.directions, 10, seed=1) and len(set(sub_a)) == 10


def _centroid(alpha: torch.Tensor) -> torch.Tensor:
    """Centroid (x, y) of coverage (F, H, W), computed with explicit pixel-centre coordinates."""
    h, w = alpha.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    area = alpha.sum((1, 2))
    return torch.stack([(alpha * xs).sum((1, 2)) / area, (alpha * ys).sum((1, 2)) / area], dim=1)


@pytest.mark.parametrize("direction,dxy", [("left", (-1, 0)), ("right", (1, 0)), ("up", (0, -1)), ("down", (0, 1))])
def test_shape_moves_in_the_captioned_direction_at_its_drawn_speed(world: ShapesWorld, direction: str, dxy) -> None:
    caption = f"a red circle moving {direction}"
    attrs = [world.parse(caption)]
    motion = world.sample_motion(attrs, torch.Generator().manual_seed(3))
    video = world.render(attrs, motion)[0]
    alpha = (video[0] + 1) / 2  # red channel: background -1, shape +1
    steps = _centroid(alpha).diff(dim=0)
    expected = torch.tensor(dxy, dtype=torch.float32) * float(motion.speed[0])
    assert torch.allclose(steps, expected.expand_as(steps), atol=0.02)
    area = alpha.sum((1, 2))
    assert torch.allclose(area, torch.full_like(area, math.pi * float(motion.radius[0]) ** 2), rtol=0.03)


def test_every_shape_stays_inside_the_frame_on_every_frame(world: ShapesWorld) -> None:
    """The outline keeps half a pixel from the border: border pixels are at most half covered (anti-aliasing),
    and no part of the shape is cut off, so its area is the same in every frame."""
    videos, _ = world.batch(256, torch.Generator().manual_seed(0))
    border = torch.cat([videos[..., 0, :], videos[..., -1, :], videos[..., :, 0], videos[..., :, -1]], dim=-1)
    assert border.max() <= 0.0
    area = ((videos.amax(1) + 1) / 2).sum((2, 3))
    assert torch.allclose(area, area[:, :1].expand_as(area), rtol=0.02)


def test_shapes_of_one_radius_have_equal_area() -> None:
    centres = torch.full((3, 1, 2), 32.0)
    alpha = coverage(signed_distance(torch.tensor([0, 1, 2]), centres, torch.full((3,), 9.0), 64))
    areas = alpha.sum((1, 2, 3))
    assert torch.allclose(areas, torch.full((3,), math.pi * 81), rtol=0.02)
    assert SHAPE_EXTENTS["triangle"][2] > SHAPE_EXTENTS["triangle"][3]  # apex up


def test_caption_parser_reads_the_attributes() -> None:
    a = parse_caption("a Yellow triangle moving down.")
    assert (a.color, a.shape, a.direction) == ("yellow", "triangle", "down")
    assert a.caption() == "a yellow triangle moving down"


@pytest.mark.parametrize(
    "caption,word",
    [("a red hexagon moving left", "hexagon"), ("a purple circle moving left", "purple"),
     ("a red circle moving sideways", "sideways")],
)
def test_unknown_word_in_a_caption_is_named(caption: str, word: str) -> None:
    with pytest.raises(CaptionError, match=word):
        parse_caption(caption)


def test_world_rejects_a_colour_outside_its_config(world: ShapesWorld) -> None:
    with pytest.raises(CaptionError, match="'magenta'.*red, green, blue, yellow"):
        world.parse("a magenta circle moving up")


def test_config_naming_an_undrawable_shape_fails_with_the_word() -> None:
    with pytest.raises(CaptionError, match="hexagon"):
        ShapesWorld(ToyConfig(shapes=["circle", "hexagon"]))


def test_world_that_cannot_fit_its_motion_names_the_knobs() -> None:
    with pytest.raises(ValueError, match="toy.radius or toy.speed"):
        ShapesWorld(ToyConfig(radius=(0.3, 0.35), speed=(0.08, 0.1)))


def test_toy_config_rejects_inverted_ranges_and_indivisible_latents() -> None:
    with pytest.raises(ConfigError, match="toy.radius"):
        load_config(None, ["toy.radius=[0.3, 0.1]"], use_env=False)
    with pytest.raises(ConfigError, match="latent_factor"):
        load_config(None, ["toy.size=26"], use_env=False)


def test_committed_toy_config_loads() -> None:
    cfg = load_config("configs/toy.yaml", use_env=False)
    assert cfg.model.family == "toy" and cfg.rewards.orm.backend == "toy-centered"  # the demo's task
    assert (cfg.data.height, cfg.data.width, cfg.data.num_frames) == (cfg.toy.size, cfg.toy.size, cfg.toy.frames)
    ShapesWorld(cfg.toy)
