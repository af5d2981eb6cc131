"""`euphonium-ray toy build`: the model folder in the real layouts, loaded by the real loaders, with named errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from euphonium_ray.cli import main as cli_main
from euphonium_ray.config import load_config
from euphonium_ray.data import DataError
from euphonium_ray.models.hunyuan import HunyuanVideoPolicy
from euphonium_ray.models.text import HunyuanTextEncoder
from euphonium_ray.toy.build import ASSETS_DIR, ToyBuildError, build_toy_model
from euphonium_ray.toy.pretrain import prompt_conditioning

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


def test_build_writes_the_diffusers_layout_and_upstream_embeddings(built: Path) -> None:
    for rel in ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
                "text_encoder/config.json", "text_encoder_2/config.json", "tokenizer/tokenizer.json",
                "tokenizer_2/tokenizer.json", "model_index.json", "prompts.txt"):
        assert (built / rel).is_file(), rel
    assert json.loads((built / "vae/config.json").read_text())["_class_name"] == "PixelUnshuffleCodec"
    assert json.loads((built / "text_encoder/config.json").read_text())["architectures"] == ["LlamaModel"]
    assert json.loads((built / "text_encoder_2/config.json").read_text())["architectures"] == ["CLIPTextModel"]
    entries = json.loads((built / "embeddings/videos2caption.json").read_text())
    assert len(entries) == 48 and entries[0]["caption"] == "a red circle moving left"
    embed = torch.load(entries[5]["prompt_embed_path"], weights_only=True)
    mask = torch.load(entries[5]["prompt_attention_mask"], weights_only=True)
    assert Path(entries[5]["prompt_embed_path"]).is_absolute()
    assert embed.shape == (1 + 16, 64) and mask.shape == (16,) and int(mask.sum()) == 6  # a colour shape moving dir + eot
    assert torch.all(embed[0, 32:] == 0)  # CLIP pooled (32) zero-padded to the LLM width in row 0


def test_build_copies_the_committed_policy_and_it_loads_through_the_real_adapter(built: Path) -> None:
    from safetensors.torch import load_file

    name = "transformer/diffusion_pytorch_model.safetensors"
    assert load_file(built / name).keys() == load_file(ASSETS_DIR / name).keys()
    policy = HunyuanVideoPolicy.from_pretrained(built, trainable="none")
    cond = prompt_conditioning(built / "embeddings/videos2caption.json", ["a red circle moving left"] * 2,
                               policy.pooled_dim)
    v = policy.velocity(torch.randn(2, 48, 8, 6, 6), torch.tensor([0.9, 0.3]), cond)
    assert v.shape == (2, 48, 8, 6, 6) and torch.isfinite(v).all()


def test_random_text_encoders_still_give_each_caption_its_own_embedding(built: Path) -> None:
    captions = (built / "prompts.txt").read_text().split("\n")[:-1]
    cond = prompt_conditioning(built / "embeddings/videos2caption.json", captions, 32)
    flat = (cond.prompt_embeds * cond.attention_mask[..., None]).flatten(1)
    dist = torch.cdist(flat, flat) + torch.eye(len(captions)) * 1e9
    assert dist.min() > 0.05 * dist[dist < 1e8].median()  # no two captions share (nearly) one embedding
    pooled = torch.cdist(cond.pooled, cond.pooled) + torch.eye(len(captions)) * 1e9
    assert pooled.min() > 0.05 * pooled[pooled < 1e8].median()


def test_stored_embedding_equals_a_direct_encode(built: Path) -> None:
    encoder = HunyuanTextEncoder.from_pretrained(built, max_tokens=16)
    direct = encoder.encode(["a blue triangle moving up"], out_dtype=torch.float32)
    entries = json.loads((built / "embeddings/videos2caption.json").read_text())
    entry = next(e for e in entries if e["caption"] == "a blue triangle moving up")
    assert torch.allclose(torch.load(entry["prompt_embed_path"], weights_only=True), direct.prompt_embed[0], atol=1e-5)


def test_missing_embedding_file_is_named(built: Path, tmp_path: Path) -> None:
    emb = tmp_path / "embeddings"
    shutil.copytree(built / "embeddings", emb)
    entries = json.loads((emb / "videos2caption.json").read_text())
    for e in entries:  # point the copy's index at the copied files (relative paths, as upstream allows)
        e["prompt_embed_path"] = f"prompt_embed/{Path(e['prompt_embed_path']).name}"
        e["prompt_attention_mask"] = f"prompt_attention_mask/{Path(e['prompt_attention_mask']).name}"
    (emb / "videos2caption.json").write_text(json.dumps(entries))
    (emb / "prompt_embed" / "3.pt").unlink()
    with pytest.raises(DataError, match=r"prompt_embed/3\.pt"):
        prompt_conditioning(emb / "videos2caption.json", [entries[3]["caption"]], 32)


def _corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:300])


def test_corrupted_text_encoder_weights_are_named(tmp_path: Path) -> None:
    assets = tmp_path / "assets"
    shutil.copytree(ASSETS_DIR, assets)
    _corrupt(assets / "text_encoder" / "model.safetensors")
    with pytest.raises(ToyBuildError, match=r"text_encoder/model\.safetensors"):
        build_toy_model(tmp_path / "out", load_config(CONFIG, use_env=False), assets=assets, log=lambda _: None)


def test_corrupted_transformer_weights_are_named_by_toy_samples(built: Path, tmp_path: Path, capsys) -> None:
    model = tmp_path / "model"
    shutil.copytree(built, model, ignore=shutil.ignore_patterns("embeddings"))
    shutil.copytree(built / "embeddings", model / "embeddings")
    _corrupt(model / "transformer" / "diffusion_pytorch_model.safetensors")
    rc = cli_main(["toy", "samples", str(model), "--out", str(tmp_path / "s"), "--count", "2", "--config", CONFIG])
    assert rc == 2
    assert "diffusion_pytorch_model.safetensors" in capsys.readouterr().err


def test_config_that_does_not_match_the_committed_policy_is_named(tmp_path: Path) -> None:
    cfg = load_config(CONFIG, ["toy.heads=4"], use_env=False)
    with pytest.raises(ToyBuildError, match=r"toy\.heads: 3 → 4.*--retrain"):
        build_toy_model(tmp_path / "out", cfg, log=lambda _: None)


def test_retrain_builds_a_new_world_end_to_end_on_cpu(tmp_path: Path) -> None:
    """A smaller world than the committed one: the text side is rebuilt, the policy pretrained, saved, reloaded."""
    sets = ["toy.size=8", "toy.frames=3", "toy.latent_factor=2", "toy.radius=[0.2, 0.25]", "toy.speed=[0.05, 0.1]",
            "toy.text_dim=16", "toy.pooled_dim=8", "toy.text_max_tokens=8", "toy.heads=1", "toy.head_dim=16",
            "toy.dual_layers=1", "toy.single_layers=1", "toy.colors=[red, blue]", "toy.directions=[left, up]"]
    cfg = load_config(CONFIG, sets, use_env=False)
    out = build_toy_model(tmp_path / "small", cfg, retrain=True, steps=3, batch=4, device="cpu", log=lambda _: None)
    info = json.loads((out / "transformer/pretrain_info.json").read_text())
    assert info["steps"] == 3 and info["toy"]["size"] == 8 and info["device"] == "cpu"
    policy = HunyuanVideoPolicy.from_pretrained(out, trainable="none")
    assert policy.codec.latent_shape(3, 8, 8) == (12, 3, 4, 4)
    assert len(json.loads((out / "embeddings/videos2caption.json").read_text())) == 3 * 2 * 2


def test_committed_artefacts_stay_small() -> None:
    total = sum(p.stat().st_size for p in ASSETS_DIR.rglob("*") if p.is_file())
    assert total < 10 * 2**20, f"committed toy artefacts are {total / 2**20:.1f} MiB"


def test_ensure_builds_once_then_reuses_the_folder(tmp_path: Path) -> None:
    from euphonium_ray.toy.build import ensure_toy_model

    cfg = load_config(CONFIG, [f"model.path={tmp_path / 'm'}"], use_env=False)
    first = ensure_toy_model(cfg, log=lambda _: None)
    stamp = (first / "transformer" / "config.json").stat().st_mtime_ns
    assert ensure_toy_model(cfg, log=lambda _: None) == first
    assert (first / "transformer" / "config.json").stat().st_mtime_ns == stamp
