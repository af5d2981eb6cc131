"""The HunyuanVideo policy adapter and the codecs, on tiny models built with the real diffusers classes.

Every model is saved with ``save_pretrained`` and loaded back through the path a user's folder takes; results are
compared with a direct call of the diffusers classes (timestep int(1000σ), guidance 6018, VAE scaling factor).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
from safetensors.torch import save_file

from euphonium_ray.models.base import LatentCodec, Policy, TextConditioning
from euphonium_ray.models.codecs import CodecError, HunyuanVAECodec, load_codec
from euphonium_ray.registry import CODECS
from euphonium_ray.models.hunyuan import HunyuanVideoPolicy, PolicyLoadError
from euphonium_ray.models.tiny import build_tiny_hunyuan
from euphonium_ray.toy.codec import PixelUnshuffleCodec

WORDS = ["a red square moving left", "a blue circle moving up"]
D, P, C = 32, 16, 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_hunyuan(tmp_path_factory.mktemp("tiny") / "hunyuan", WORDS, text_dim=D, pooled_dim=P,
                              latent_channels=C)


def make_cond(batch: int, length: int = 6, seed: int = 1) -> TextConditioning:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, length, dtype=torch.int64)
    for b in range(batch):
        mask[b, : length - b] = 1  # right-padded, different lengths
    return TextConditioning(torch.randn(batch, length, D, generator=g), mask, torch.randn(batch, P, generator=g))


def direct_velocity(transformer, x, timesteps, cond, guidance=6018.0):
    with torch.no_grad():
        return transformer(
            hidden_states=x, timestep=torch.tensor(timesteps), encoder_hidden_states=cond.prompt_embeds,
            encoder_attention_mask=cond.attention_mask, pooled_projections=cond.pooled,
            guidance=torch.full((x.shape[0],), guidance), return_dict=False,
        )[0]


# ------------------------------------------------------------------------------------------- policy
def test_policy_velocity_matches_diffusers_forward_with_truncated_timestep_and_guidance(model_dir):
    policy = HunyuanVideoPolicy.from_pretrained(model_dir)
    assert isinstance(policy, Policy) and isinstance(policy.codec, LatentCodec)
    reference = HunyuanVideoTransformer3DModel.from_pretrained(model_dir / "transformer")
    x = torch.randn(2, C, 3, 4, 4)
    cond = make_cond(2)
    sigma = torch.tensor([0.5357, 0.9868])  # upstream truncates: 535, 986
    with torch.no_grad():
        v = policy.velocity(x, sigma, cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    torch.testing.assert_close(v, direct_velocity(reference, x, [535, 986], cond), rtol=0, atol=0)
    other_guidance = direct_velocity(reference, x, [535, 986], cond, guidance=1000.0)
    assert not torch.allclose(v, other_guidance)  # the guidance value really reaches the network


def test_python_float_sigma_truncates_like_upstream(model_dir):
    policy = HunyuanVideoPolicy.from_pretrained(model_dir, with_codec=False)
    reference = HunyuanVideoTransformer3DModel.from_pretrained(model_dir / "transformer")
    x, cond = torch.randn(2, C, 2, 4, 4), make_cond(2)
    with torch.no_grad():  # float32(0.7)·1000 = 699.99998 would truncate to 699; upstream's python float gives 700
        torch.testing.assert_close(policy.velocity(x, 0.7, cond), direct_velocity(reference, x, [700, 700], cond))


def test_attention_runs_through_torch_sdpa(model_dir, monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(kwargs.get("attn_mask") is not None)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    policy = HunyuanVideoPolicy.from_pretrained(model_dir, with_codec=False)
    with torch.no_grad():
        policy.velocity(torch.randn(1, C, 2, 4, 4), 0.5, make_cond(1))
    assert len(calls) >= 3 and all(calls)  # refiner, dual and single blocks, each with the text padding mask


def test_gradient_checkpointing_gives_the_same_gradients(model_dir):
    x, cond = torch.randn(2, C, 2, 4, 4), make_cond(2)
    grads = []
    for checkpointing in (False, True):
        policy = HunyuanVideoPolicy.from_pretrained(model_dir, with_codec=False,
                                                    gradient_checkpointing=checkpointing)
        policy.transformer.train()
        assert policy.transformer.gradient_checkpointing is checkpointing
        policy.velocity(x, torch.tensor([0.4, 0.9]), cond).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in policy.trainable_parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_weights_give_fp32_velocity_close_to_fp32(model_dir):
    fp32 = HunyuanVideoPolicy.from_pretrained(model_dir, dtype="fp32", with_codec=False)
    bf16 = HunyuanVideoPolicy.from_pretrained(model_dir, dtype="bf16", with_codec=False)
    assert bf16.dtype == torch.bfloat16
    x, cond = torch.randn(1, C, 2, 4, 4), make_cond(1)
    with torch.no_grad():
        v32, v16 = fp32.velocity(x, 0.5, cond), bf16.velocity(x, 0.5, cond)
    assert v16.dtype == torch.float32
    assert (v16 - v32).abs().max() < 0.1 * v32.abs().max()


def test_velocity_rejects_text_of_the_wrong_width(model_dir):
    policy = HunyuanVideoPolicy.from_pretrained(model_dir, with_codec=False)
    bad = TextConditioning(torch.randn(1, 6, D + 1), torch.ones(1, 6, dtype=torch.int64), torch.randn(1, P))
    with pytest.raises(ValueError, match="text_embed_dim=32"):
        policy.velocity(torch.randn(1, C, 2, 4, 4), 0.5, bad)


def test_model_folder_without_vae_is_an_error_naming_the_path(model_dir, tmp_path):
    broken = tmp_path / "novae"
    shutil.copytree(model_dir / "transformer", broken / "transformer")
    with pytest.raises(PolicyLoadError, match=str(broken / "vae")):
        HunyuanVideoPolicy.from_pretrained(broken)
    with pytest.raises(PolicyLoadError, match="has no transformer/"):
        HunyuanVideoPolicy.from_pretrained(tmp_path)


def _perturbed_transformer_folder(model_dir: Path, out: Path, seed: int = 3) -> HunyuanVideoTransformer3DModel:
    model = HunyuanVideoTransformer3DModel.from_pretrained(model_dir / "transformer")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return model


def test_checkpoint_folder_is_loaded_over_the_base_transformer(model_dir, tmp_path):
    trained = _perturbed_transformer_folder(model_dir, tmp_path / "ckpt")
    policy = HunyuanVideoPolicy.from_pretrained(model_dir, checkpoint=tmp_path / "ckpt", with_codec=False)
    x, cond = torch.randn(1, C, 2, 4, 4), make_cond(1)
    with torch.no_grad():
        torch.testing.assert_close(policy.velocity(x, 0.7, cond), direct_velocity(trained, x, [700], cond))


def test_checkpoint_with_missing_and_extra_keys_lists_them(model_dir, tmp_path):
    state = HunyuanVideoTransformer3DModel.from_pretrained(model_dir / "transformer").state_dict()
    dropped = "proj_out.weight"
    state = {k: v.contiguous() for k, v in state.items() if k != dropped}
    state["not_a_layer.weight"] = torch.zeros(2)
    (tmp_path / "bad").mkdir()
    save_file(state, str(tmp_path / "bad" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(PolicyLoadError) as err:
        HunyuanVideoPolicy.from_pretrained(model_dir, checkpoint=tmp_path / "bad", with_codec=False)
    assert "missing keys (1): proj_out.weight" in str(err.value)
    assert "unexpected keys (1): not_a_layer.weight" in str(err.value)


def test_corrupted_checkpoint_safetensors_is_named(model_dir, tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(PolicyLoadError, match=str(weights)):
        HunyuanVideoPolicy.from_pretrained(model_dir, checkpoint=folder, with_codec=False)


def test_full_sync_state_dict_round_trips_and_rejects_wrong_keys(model_dir, tmp_path):
    trained = _perturbed_transformer_folder(model_dir, tmp_path / "t")
    source = HunyuanVideoPolicy(trained, None)
    target = HunyuanVideoPolicy.from_pretrained(model_dir, with_codec=False)
    x, cond = torch.randn(1, C, 2, 4, 4), make_cond(1)
    target.load_sync_state_dict(source.sync_state_dict())
    with torch.no_grad():
        torch.testing.assert_close(target.velocity(x, 0.3, cond), source.velocity(x, 0.3, cond), rtol=0, atol=0)
    state = source.sync_state_dict()
    state.pop("proj_out.bias")
    with pytest.raises(PolicyLoadError, match="missing keys \\(1\\): proj_out.bias"):
        target.load_sync_state_dict(state)


# --------------------------------------------------------------------------------------------- LoRA
def test_lora_trains_only_adapters_and_saves_merged_weights_plus_adapter(model_dir, tmp_path):
    policy = HunyuanVideoPolicy.from_pretrained(model_dir, trainable="lora", lora_rank=2, lora_alpha=4.0,
                                                with_codec=False)
    names = [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {id(p) for p in policy.trainable_parameters()} == {
        id(p) for n, p in policy.transformer.named_parameters() if "lora_" in n}
    assert set(policy.sync_state_dict()) == set(names)
    assert any(".attn.to_q." in n for n in names) and any(".attn.add_q_proj." in n for n in names)

    x, cond = torch.randn(2, C, 2, 4, 4), make_cond(2)
    base = HunyuanVideoTransformer3DModel.from_pretrained(model_dir / "transformer")
    with torch.no_grad():
        torch.testing.assert_close(policy.velocity(x, 0.6, cond), direct_velocity(base, x, [600, 600], cond))
        for n, p in policy.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
        v_lora = policy.velocity(x, 0.6, cond)
    assert not torch.allclose(v_lora, direct_velocity(base, x, [600, 600], cond))

    policy.save_pretrained(tmp_path / "saved")
    merged = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(direct_velocity(merged, x, [600, 600], cond), v_lora, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "saved" / "lora" / "pytorch_lora_weights.safetensors").is_file()

    fresh = HunyuanVideoPolicy.from_pretrained(model_dir, trainable="lora", lora_rank=2, lora_alpha=4.0,
                                               with_codec=False)
    fresh.load_pretrained(tmp_path / "saved")  # restores the adapter, not the merge (which would apply it twice)
    with torch.no_grad():
        torch.testing.assert_close(fresh.velocity(x, 0.6, cond), v_lora, rtol=0, atol=0)
    fresh.load_sync_state_dict(policy.sync_state_dict())


# -------------------------------------------------------------------------------------------- codecs
def test_hunyuan_vae_codec_round_trip_matches_diffusers_with_scaling_factor(model_dir, tmp_path):
    vae_dir = tmp_path / "vae"
    shutil.copytree(model_dir / "vae", vae_dir)
    cfg = json.loads((vae_dir / "config.json").read_text())
    assert cfg["scaling_factor"] == pytest.approx(0.476986)  # upstream's value is the default
    cfg["scaling_factor"] = 0.25  # and the codec must read it from the file, not assume it
    (vae_dir / "config.json").write_text(json.dumps(cfg))
    codec = load_codec(vae_dir)
    assert isinstance(codec, HunyuanVAECodec) and codec.vae.use_tiling
    assert codec.latent_shape(9, 32, 16) == (C, 3, 4, 2)
    assert codec.latent_shape(32, 480, 480) == (C, 8, 60, 60)  # upstream's default video

    vae = AutoencoderKLHunyuanVideo.from_pretrained(vae_dir)
    video = torch.rand(1, 3, 9, 32, 16) * 2 - 1
    z = codec.encode(video)
    assert z.shape == (1, *codec.latent_shape(9, 32, 16)) and z.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(z, vae.encode(video).latent_dist.mode() * 0.25)
        expected = vae.decode(z / 0.25).sample.clamp(-1, 1)
    decoded = codec.decode(z)
    assert decoded.shape == (1, 3, codec.num_frames(3), 32, 16)
    torch.testing.assert_close(decoded, expected)


def test_pixel_unshuffle_codec_is_dispatched_by_class_name(tmp_path):
    PixelUnshuffleCodec(factor=2, shift=-0.5, scale=2.0).save_pretrained(tmp_path / "vae")
    codec = load_codec(tmp_path / "vae")
    assert isinstance(codec, PixelUnshuffleCodec) and codec.factor == 2
    video = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    torch.testing.assert_close(codec.decode(codec.encode(video)), video)


def test_registered_codec_factory_gets_config_and_folder(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(CODECS, "_entries", dict(CODECS._entries))  # the registration ends with this test

    def factory(config, folder, **kwargs):
        seen.update(config=config, folder=folder, **kwargs)
        return PixelUnshuffleCodec(factor=int(config["block"]))

    CODECS.register("BlockCodecForTest", factory, replace=True)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "BlockCodecForTest", "block": 4}))
    codec = load_codec(tmp_path)
    assert codec.factor == 4 and seen["folder"] == tmp_path and seen["dtype"] == torch.float32


def test_unknown_codec_class_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    with pytest.raises(CodecError, match=f"{tmp_path / 'config.json'}.*AutoencoderKLWan"):
        load_codec(tmp_path)
    with pytest.raises(CodecError, match="codec config not found"):
        load_codec(tmp_path / "nowhere")
