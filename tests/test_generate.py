"""``euphonium-ray generate`` on tiny models: files written, upstream's seeding, the ODE path checked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v2 as iio
import pytest
import torch
from PIL import Image

import euphonium_ray.generate as gen
from euphonium_ray.config import RGGConfig
from euphonium_ray.data import PromptEmbeddingDataset
from euphonium_ray.models.hunyuan import HunyuanVideoPolicy
from euphonium_ray.models.prm import LatentPRM
from euphonium_ray.models.tiny import build_tiny_hunyuan, build_tiny_text_side, build_tiny_transformer
from euphonium_ray.preprocess import preprocess_prompts
from euphonium_ray.sampling import make_generators
from euphonium_ray.sde import sigma_schedule
from euphonium_ray.toy.codec import PixelUnshuffleCodec

PROMPTS = ["a red square moving left", "a blue circle moving up"]
SMALL = ["--steps", "3", "--frames", "5", "--height", "16", "--width", "16", "--max-tokens", "8", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gen")
    model = build_tiny_hunyuan(root / "model", PROMPTS, text_dim=32, pooled_dim=16, latent_channels=4)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return model, prompts


def test_generate_writes_mp4s_contact_sheet_and_upstream_seeds(world, tmp_path):
    model, prompts = world
    out = tmp_path / "out"
    assert gen.main(["--model", str(model), "--prompts", str(prompts), "--out", str(out), "--num-videos", "2",
                     "--seed", "7", *SMALL]) == 0
    meta = json.loads((out / "samples.json").read_text())
    seeds = [(s["prompt_index"], s["video_index"], s["seed"]) for s in meta["samples"]]
    assert seeds == [(0, 0, 7), (0, 1, 8), (1, 0, 1007), (1, 1, 1008)]
    for sample in meta["samples"]:
        path = Path(sample["path"])
        assert path.suffix == ".mp4" and path.is_file()
        frames = iio.mimread(path)
        assert len(frames) == 5 and frames[0].shape == (16, 16, 3)  # 2 latent frames → 4·1+1 decoded frames
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size == (8 * 16, 4 * 16)
    assert (out / "embeddings" / "videos2caption.json").is_file()  # the .txt was encoded first


def test_ode_sampling_matches_a_hand_written_euler_loop_and_is_batch_independent(world, tmp_path):
    model, prompts = world
    policy = HunyuanVideoPolicy.from_pretrained(model, trainable="none")
    index = preprocess_prompts(model, prompts, tmp_path / "emb", max_tokens=8, progress=False)
    cond, _ = PromptEmbeddingDataset(index, pooled_dim=16).conditioning([0, 1])
    cond = cond.to(dtype=torch.float32)
    shape = policy.codec.latent_shape(5, 16, 16)
    seeds = [gen.video_seed(42, i, 0) for i in range(2)]
    latents = gen.sample_video_latents(policy, cond, latent_shape=shape, num_steps=4, shift=5.0, noise_type="ode",
                                       generator=make_generators(seeds))

    sigmas = sigma_schedule(4, 5.0)
    for row, seed in enumerate(seeds):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))[None]
        one = cond.index(slice(row, row + 1))
        with torch.no_grad():
            for i in range(4):
                v = policy.velocity(x, sigmas[i : i + 1], one)
                x = x + (sigmas[i + 1] - sigmas[i]) * v  # Euler: x_{i+1} = x_i − Δt·v
        torch.testing.assert_close(latents[row], x[0], rtol=1e-5, atol=1e-5)
        alone = gen.sample_video_latents(policy, one, latent_shape=shape, num_steps=4, shift=5.0,
                                         noise_type="ode", generator=make_generators([seed]))
        torch.testing.assert_close(alone[0], latents[row], rtol=1e-5, atol=1e-5)  # same noise whatever the batch


def test_rgg_sampler_with_a_prm_folder_moves_the_samples(world, tmp_path):
    model, prompts = world
    policy = HunyuanVideoPolicy.from_pretrained(model, trainable="none")
    LatentPRM.from_policy(policy.transformer, num_dual_blocks=1).save_pretrained(tmp_path / "prm")
    common = ["--model", str(model), "--prompts", str(prompts), "--max-prompts", "1", "--rgg-start", "1",
              "--rgg-scale", "50.0", *SMALL]
    assert gen.main([*common, "--out", str(tmp_path / "sde"), "--sampler", "sde"]) == 0
    assert gen.main([*common, "--out", str(tmp_path / "rgg"), "--sampler", "rgg", "--prm", str(tmp_path / "prm")]) == 0
    sde = json.loads((tmp_path / "sde" / "samples.json").read_text())["samples"][0]
    rgg = json.loads((tmp_path / "rgg" / "samples.json").read_text())["samples"][0]
    assert sde["seed"] == rgg["seed"] == 42
    a, b = iio.mimread(sde["path"]), iio.mimread(rgg["path"])
    assert any((fa.astype(int) - fb.astype(int)).any() for fa, fb in zip(a, b))  # same noise, guided drift differs


def test_rgg_without_prm_and_rgg_window_past_the_schedule_are_errors(world, tmp_path, capsys):
    model, prompts = world
    assert gen.main(["--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path), "--sampler", "rgg",
                     *SMALL]) == 2
    assert "--prm" in capsys.readouterr().err
    settings = gen.GenerateSettings(sampler="rgg", num_videos=1, seed=0, num_steps=3, shift=5.0, eta=0.25,
                                    flow_a=0.7, noise_type="dance", frames=5, height=16, width=16, fps=8,
                                    rgg=RGGConfig(start=12))
    with pytest.raises(ValueError, match="rgg.start=12 is past the last of 3"):
        gen.generate(None, None, tmp_path, settings, prm=object())  # type: ignore[arg-type]


def test_generate_works_for_a_toy_layout_folder_and_falls_back_to_gif(tmp_path, monkeypatch):
    root = tmp_path / "toy"
    PixelUnshuffleCodec(factor=4, shift=-0.9, scale=2.5).save_pretrained(root / "vae")
    build_tiny_transformer(root / "transformer", in_channels=48, text_dim=32, pooled_dim=16)
    build_tiny_text_side(root, PROMPTS, text_dim=32, pooled_dim=16)
    (tmp_path / "p.txt").write_text(PROMPTS[0] + "\n")
    monkeypatch.setattr(gen, "ffmpeg_available", lambda: False)
    assert gen.main(["--model", str(root), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"),
                     "--steps", "2", "--frames", "3", "--height", "8", "--width", "8", "--no-progress"]) == 0
    sample = json.loads((tmp_path / "o" / "samples.json").read_text())["samples"][0]
    assert sample["path"].endswith(".gif")
    frames = iio.mimread(sample["path"])
    assert len(frames) == 3 and frames[0].shape[:2] == (8, 8)  # the toy codec keeps frames one-to-one
