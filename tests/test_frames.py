"""Frame sampling, resizing and normalisation shared by the pixel ORMs, checked against independent computations."""

from __future__ import annotations

import base64
import io
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from euphonium_ray.models.frames import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FrameSamplingError,
    internvl_pixel_values,
    judge_frames,
    png_data_url,
    sample_frames,
    segment_centre_indices,
)

torch.set_num_threads(1)


def exact_upstream_indices(num_frames: int, num_segments: int) -> list[int]:
    """SoliReward's get_index in exact rational arithmetic: floor(s/2 + round_half_even(s·k)), s = (F−1)/n."""
    seg = Fraction(num_frames - 1, num_segments)
    return [int(seg / 2 + round(seg * k)) for k in range(num_segments)]  # Fraction.__round__ is half-to-even


def test_segment_centres_match_exact_rational_computation_for_eight_segments():
    for num_frames in range(8, 300):
        assert segment_centre_indices(num_frames, 8) == exact_upstream_indices(num_frames, 8), num_frames


def test_segment_centres_for_hunyuan_lengths_are_the_segment_midpoints():
    # 33 frames: s = 4, picks 2, 6, …, 30; 129 frames: s = 16, picks 8, 24, …, 120 (exact centres, no rounding).
    assert segment_centre_indices(33, 8) == [2 + 4 * k for k in range(8)]
    assert segment_centre_indices(129, 8) == [8 + 16 * k for k in range(8)]


def test_segment_centres_reproduce_upstream_half_to_even_quirk():
    # 13 frames: s = 1.5; s·3 = 4.5 and s·7 = 10.5 round to even, so segments 3 and 7 pick frames 4 and 10,
    # below their centres 5.25 and 11.25.
    assert segment_centre_indices(13, 8) == [0, 2, 3, 4, 6, 8, 9, 10]
    # As many frames as segments: the last frame is never picked and frame 4 twice (upstream does the same).
    assert segment_centre_indices(8, 8) == [0, 1, 2, 3, 4, 4, 5, 6]


@pytest.mark.parametrize("num_segments", [1, 3, 5, 7, 16])
def test_each_pick_is_near_its_segment_centre_and_picks_never_go_backwards(num_segments):
    # floor(s/2 + round(s·k)) lies in (centre − 1.5, centre + 0.5] for the centre s·(k + ½) of segment k.
    for num_frames in range(num_segments, 200):
        seg = (num_frames - 1) / num_segments
        picks = segment_centre_indices(num_frames, num_segments)
        assert picks == sorted(picks) and 0 <= picks[0] and picks[-1] <= num_frames - 1
        for k, index in enumerate(picks):
            assert -1.5 < index - seg * (k + 0.5) <= 0.5 + 1e-9, (num_frames, k, index)


def test_video_shorter_than_the_frames_asked_for_is_rejected_with_both_counts():
    with pytest.raises(FrameSamplingError, match=r"5 frames, fewer than the 8 frames .*rewards\.orm\.num_frames=8"):
        judge_frames(torch.zeros(1, 3, 5, 16, 16), num_segments=8, size=16)


@pytest.mark.parametrize(
    "videos, message",
    [
        (torch.zeros(3, 5, 16, 16), r"shape \(B, 3, F, H, W\), got \(3, 5, 16, 16\)"),
        (torch.zeros(1, 4, 8, 16, 16), r"shape \(B, 3, F, H, W\), got \(1, 4, 8, 16, 16\)"),
        (torch.full((1, 3, 8, 16, 16), 200.0), r"must be in \[-1, 1\].*got values in \[200, 200\]"),
        (torch.full((1, 3, 8, 16, 16), float("nan")), "NaN or infinite"),
        (torch.zeros(1, 3, 8, 16, 16, dtype=torch.uint8), "floating tensor"),
    ],
)
def test_malformed_video_batches_are_rejected_naming_the_problem(videos, message):
    with pytest.raises(FrameSamplingError, match=message):
        judge_frames(videos, num_segments=8, size=16)


def test_sample_frames_picks_the_indexed_frames_of_every_video():
    videos = torch.arange(2 * 3 * 13, dtype=torch.float32).reshape(2, 3, 13, 1, 1).expand(2, 3, 13, 4, 4)
    picked = sample_frames(videos, 8)
    assert picked.shape == (2, 8, 3, 4, 4)
    for b in range(2):
        for k, f in enumerate(segment_centre_indices(13, 8)):
            assert torch.equal(picked[b, k], videos[b, :, f])


def _pil_upstream_pipeline(frame_chw: torch.Tensor, size: int) -> np.ndarray:
    """What upstream does to one frame: uint8 (as the mp4 holds it) → PIL bicubic to size² → /255 → ImageNet norm."""
    u8 = np.round(((frame_chw.permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1) * 255).astype(np.uint8)
    resized = np.asarray(Image.fromarray(u8).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    return (resized - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)


def test_internvl_pixel_values_match_upstreams_pil_pipeline_when_downscaling():
    g = torch.Generator().manual_seed(0)
    videos = torch.rand(2, 3, 13, 72, 96, generator=g) * 2 - 1  # noise: the hardest case for a resize match
    pixel_values = internvl_pixel_values(videos, num_segments=8, size=32)
    assert pixel_values.shape == (2 * 8, 3, 32, 32)
    level = 1.0 / 255.0 / min(IMAGENET_STD)  # one 8-bit level in normalised units
    for b in range(2):
        for k, f in enumerate(segment_centre_indices(13, 8)):
            ours = pixel_values[b * 8 + k].permute(1, 2, 0).numpy()
            diff = np.abs(ours - _pil_upstream_pipeline(videos[b, :, f], 32))
            assert diff.mean() < 0.5 * level and diff.max() < 6.5 * level  # PIL rounds between its two passes


def test_judge_frames_match_pil_bicubic_when_upscaling_smooth_frames():
    g = torch.Generator().manual_seed(1)
    small = torch.rand(1, 3 * 9, 6, 8, generator=g)
    videos = torch.nn.functional.interpolate(small, size=(18, 24), mode="bilinear").reshape(1, 3, 9, 18, 24) * 2 - 1
    frames = judge_frames(videos, num_segments=4, size=40)
    for k, f in enumerate(segment_centre_indices(9, 4)):
        u8 = np.round(((videos[0, :, f].permute(1, 2, 0).numpy() + 1) / 2) * 255).astype(np.uint8)
        ref = np.asarray(Image.fromarray(u8).resize((40, 40), Image.BICUBIC), dtype=np.float32) / 255.0
        assert np.abs(frames[0, k].permute(1, 2, 0).numpy() - ref).max() <= 2.01 / 255


def test_png_data_url_is_lossless_for_8_bit_frames():
    g = torch.Generator().manual_seed(2)
    frame = torch.randint(0, 256, (3, 10, 12), generator=g).float() / 255.0
    url = png_data_url(frame)
    assert url.startswith("data:image/png;base64,")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    assert np.array_equal(decoded, (frame.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
