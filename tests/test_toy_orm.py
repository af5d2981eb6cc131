"""The toy pixel ORM: real videos score high, and each thing a physics/deformity judge checks lowers its own term."""

from __future__ import annotations

import math

import pytest
import torch

from euphonium_ray.config import ToyConfig
from euphonium_ray.models.base import OutcomeRewardModel
from euphonium_ray.toy.data import ShapesWorld
from euphonium_ray.toy.orm import ToyPixelORM
from euphonium_ray.toy.vocab import CaptionError

SWAP = {"left": "right", "right": "left", "up": "down", "down": "up", "red": "green", "green": "blue",
        "blue": "yellow", "yellow": "red", "circle": "square", "square": "triangle", "triangle": "circle"}


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(ToyConfig())


@pytest.fixture(scope="module")
def orm() -> ToyPixelORM:
    return ToyPixelORM.from_config(ToyConfig())


@pytest.fixture(scope="module")
def real(world: ShapesWorld):
    return world.prompts, world.videos(world.prompts, seed=11)


def _swap(caption: str, kind: tuple[str, ...]) -> str:
    return " ".join(SWAP[w] if w in kind and w in SWAP else w for w in caption.split())


def test_orm_implements_the_outcome_reward_contract(orm: ToyPixelORM) -> None:
    assert isinstance(orm, OutcomeRewardModel)


def test_real_videos_score_near_one_on_every_term(orm: ToyPixelORM, real) -> None:
    caps, videos = real
    terms = orm.score_terms(videos, caps)
    assert terms.score.min() > 0.93
    for name, value in terms.as_dict().items():
        assert value.min() > 0.9, name


def test_wrong_caption_attributes_lower_their_own_terms(orm: ToyPixelORM, real) -> None:
    caps, videos = real
    good = orm.score_terms(videos, caps)
    wrong_color = orm.score_terms(videos, [_swap(c, ("red", "green", "blue", "yellow")) for c in caps])
    wrong_dir = orm.score_terms(videos, [_swap(c, ("left", "right", "up", "down")) for c in caps])
    wrong_shape = orm.score_terms(videos, [_swap(c, ("circle", "square", "triangle")) for c in caps])
    assert wrong_color.color.max() < 0.1 and torch.allclose(wrong_color.form, good.form)
    assert wrong_dir.direction.max() < 0.05 and torch.allclose(wrong_dir.smooth, good.smooth)
    assert (wrong_shape.form < good.form - 0.1).all()
    for bad in (wrong_color, wrong_dir, wrong_shape):
        assert (bad.score < good.score - 0.04).all()


def test_deformations_and_bad_motion_lower_the_score(orm: ToyPixelORM, real) -> None:
    caps, videos = real
    good = orm.score_terms(videos, caps)
    static = orm.score_terms(videos[:, :, :1].expand_as(videos).clone(), caps)
    assert static.direction.max() < 0.01
    blurred = torch.nn.functional.avg_pool3d(videos, (1, 3, 3), 1, (0, 1, 1), count_include_pad=False)
    assert (orm.score_terms(blurred, caps).form < good.form - 0.2).all()
    shuffled = videos[:, :, torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])]
    assert (orm.score_terms(shuffled, caps).smooth < good.smooth - 0.3).all()
    shrinking = videos.clone()
    shrinking[:, :, 4:] = -1.0  # the shape vanishes half-way
    assert (orm.score(shrinking, caps) < good.score - 0.2).all()


def test_noise_scores_far_below_real_videos(orm: ToyPixelORM, real) -> None:
    caps, videos = real
    noise = torch.rand(videos.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert orm.score(noise, caps).mean() < 0.25 < 0.9 < orm.score(videos, caps).mean()


def test_color_term_matches_a_hand_computed_frame(orm: ToyPixelORM) -> None:
    """A pure-red block and a half-red block (α = 0.5) plus one green pixel: C = Σm / Σa computed by hand."""
    video = torch.full((1, 3, 2, 24, 24), -1.0)
    video[0, 0, :, 4:8, 4:8] = 1.0  # 16 red pixels, m = a = 1
    video[0, 0, :, 10:12, 10:12] = 0.0  # 4 half-covered red pixels: t = 0.5, residual 0 -> m = a = 0.5
    video[0, 1, :, 20, 20] = 1.0  # one green pixel: m = 0, a = 1
    terms = orm.score_terms(video, ["a red square moving left"])
    expected = (16 + 4 * 0.5) / (16 + 4 * 0.5 + 1)
    assert math.isclose(float(terms.color), expected, rel_tol=1e-5)


def test_scores_are_batched_and_deterministic(orm: ToyPixelORM, real) -> None:
    caps, videos = real
    batch = orm.score(videos[:8], caps[:8])
    single = torch.cat([orm.score(videos[i : i + 1], caps[i : i + 1]) for i in range(8)])
    assert torch.allclose(batch, single, atol=1e-6)
    assert torch.equal(batch, orm.score(videos[:8], caps[:8]))


def test_bad_input_is_named(orm: ToyPixelORM, real) -> None:
    caps, videos = real
    with pytest.raises(CaptionError, match="octagon"):
        orm.score(videos[:1], ["a red octagon moving left"])
    with pytest.raises(ValueError, match="2 videos but 1 captions"):
        orm.score(videos[:2], caps[:1])
    nan = videos[:1].clone()
    nan[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        orm.score(nan, caps[:1])


def test_faint_pixel_noise_is_not_taken_for_deformation(orm: ToyPixelORM, real) -> None:
    """A sampler's last noise injection leaves ~0.04 of pixel noise; a judge of form and motion ignores it."""
    caps, videos = real
    noisy = videos + 0.04 * torch.randn(videos.shape, generator=torch.Generator().manual_seed(2))
    assert orm.score(noisy, caps).mean() > orm.score(videos, caps).mean() - 0.02
