"""`euphonium-ray toy samples`: PNG grids and GIFs a person can look at, with and without a PRM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from euphonium_ray.cli import main as cli_main
from euphonium_ray.config import load_config
from euphonium_ray.toy.samples import LABEL_WIDTH, SCALE, video_grid, write_gif, write_samples

CONFIG = "configs/toy.yaml"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine run ~20x faster on one thread than on two (no thread hand-offs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "model"
    assert cli_main(["toy", "build", str(out), "--config", CONFIG]) == 0
    return out


def test_grid_places_each_frame_enlarged_in_its_cell() -> None:
    video = torch.full((2, 3, 3, 4, 4), -1.0)
    video[1, 0, 2] = 1.0  # second video, third frame: red
    img = video_grid(video, ["a", "b"])
    cell = 4 * SCALE + 1
    assert img.size == (LABEL_WIDTH + 3 * cell + 1, 2 * cell + 1)
    assert img.getpixel((LABEL_WIDTH + 2 * cell + 1 + 5, cell + 1 + 5)) == (255, 0, 0)
    assert img.getpixel((LABEL_WIDTH + 1 * cell + 1 + 5, cell + 1 + 5)) == (0, 0, 0)


def test_gif_has_one_image_per_frame(tmp_path: Path) -> None:
    path = write_gif(torch.rand(3, 3, 5, 4, 4) * 2 - 1, tmp_path / "v.gif")
    with Image.open(path) as gif:
        assert gif.n_frames == 5


def test_samples_command_writes_base_and_real_grids_with_orm_scores(built: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "samples"
    assert cli_main(["toy", "samples", str(built), "--out", str(out), "--count", "4", "--config", CONFIG,
                    "--set", "sampler.num_steps=6", "--set", "rgg.start=3"]) == 0
    printed = capsys.readouterr().out
    assert "mean ORM: base" in printed and "real" in printed
    for name in ("base_samples.png", "base_samples.gif", "real_samples.png", "samples.json"):
        assert (out / name).is_file(), name
    with Image.open(out / "base_samples.png") as img:
        assert img.size[1] == 4 * (24 * SCALE + 1) + 1


def test_a_prm_adds_guided_samples_from_the_same_seeds(built: Path, tmp_path: Path) -> None:
    from euphonium_ray.models.prm import LatentPRM
    from euphonium_ray.toy.samples import load_policy

    cfg = load_config(CONFIG, ["rgg.scale_mode=fixed", "rgg.scale=50.0", "rgg.normalize=true",
                                      "sampler.num_steps=6", "rgg.start=3"], use_env=False)
    prm = LatentPRM.from_policy(load_policy(built).transformer, num_dual_blocks=1)
    first = write_samples(built, tmp_path / "a", cfg, count=2, prm=prm)
    again = write_samples(built, tmp_path / "b", cfg, count=2)
    assert {"base_png", "guided_png", "guided_gif"} <= set(first.paths)
    assert first.orm["base"] == again.orm["base"]  # same seeds: the unguided samples do not depend on the PRM
    base = (tmp_path / "a" / "base_samples.png").read_bytes()
    assert base == (tmp_path / "b" / "base_samples.png").read_bytes()
    assert (tmp_path / "a" / "guided_samples.png").read_bytes() != base  # the gradient moved the guided ones


def test_guided_samples_on_the_ode_sampler_with_target_ratio_guidance_are_refused_in_one_line(built: Path,
                                                                                              tmp_path: Path) -> None:
    """Target-ratio guidance is a fraction of the step's noise: on the ODE sampler it would be zero, and the
    'guided' grid would silently repeat the base one."""
    from euphonium_ray.models.prm import LatentPRM
    from euphonium_ray.toy.samples import load_policy

    cfg = load_config(CONFIG, ["rgg.scale_mode=target_ratio", "sampler.num_steps=4"], use_env=False)
    prm = LatentPRM.from_policy(load_policy(built).transformer, num_dual_blocks=1)
    with pytest.raises(ValueError, match=r"^guided samples on the ODE sampler need rgg\.scale_mode fixed or kl"):
        write_samples(built, tmp_path / "a", cfg, count=2, prm=prm)
    assert not (tmp_path / "a").exists()
