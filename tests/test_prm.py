"""LatentPRM: built from a real (tiny) diffusers HunyuanVideo transformer; gradients, files and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel

from euphonium_ray.models.base import ProcessRewardModel, TextConditioning
from euphonium_ray.models.prm import LatentPRM, PRMLoadError
from euphonium_ray.sde import network_timestep

C, T, H, W = 4, 2, 4, 4
TEXT_DIM, POOLED_DIM, TEXT_LEN = 12, 6, 5


def tiny_policy(guidance_embeds: bool = False, seed: int = 0) -> HunyuanVideoTransformer3DModel:
    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=C, out_channels=C, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM, rope_axes_dim=(2, 2, 4), guidance_embeds=guidance_embeds,
    ).eval()


def tiny_cond(batch: int, seed: int = 1) -> TextConditioning:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, TEXT_LEN, dtype=torch.int64)
    for i in range(batch):
        mask[i, : 1 + (i % TEXT_LEN)] = 1
    return TextConditioning(torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g), mask,
                            torch.randn(batch, POOLED_DIM, generator=g))


def latents(batch: int, seed: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, C, T, H, W, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="module")
def prm() -> LatentPRM:
    return LatentPRM.from_policy(tiny_policy(), num_dual_blocks=1, num_single_blocks=1).eval()


def test_prm_satisfies_the_process_reward_model_contract(prm: LatentPRM) -> None:
    assert isinstance(prm, ProcessRewardModel)
    scores = prm.score(latents(3), torch.tensor([0.9, 0.4, 0.0]), tiny_cond(3))
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()


def test_from_policy_copies_the_policys_embeddings_and_first_blocks_and_leaves_the_policy_alone() -> None:
    policy = tiny_policy()
    prm = LatentPRM.from_policy(policy, num_dual_blocks=1, num_single_blocks=0)
    assert len(prm.backbone.transformer_blocks) == 1 and len(prm.backbone.single_transformer_blocks) == 0
    source = policy.state_dict()
    for name, value in prm.backbone.state_dict().items():
        assert torch.equal(value, source[name]), name
    with torch.no_grad():
        next(prm.backbone.parameters()).add_(1.0)
    assert not torch.equal(next(prm.backbone.parameters()), next(policy.parameters()))


def test_pooled_tokens_are_the_policys_hidden_states_after_the_kept_blocks() -> None:
    """With every block kept, the hook sees exactly what the full policy feeds its own norm_out."""
    policy = tiny_policy()
    prm = LatentPRM.from_policy(policy, num_dual_blocks=2, num_single_blocks=1).eval()
    seen: dict[str, torch.Tensor] = {}
    policy.norm_out.register_forward_pre_hook(lambda m, a: seen.__setitem__("tokens", a[0]))
    prm.pool.register_forward_pre_hook(lambda m, a: seen.__setitem__("pooled_input", a[0]))
    x, cond, sigma = latents(2), tiny_cond(2), torch.tensor([0.7, 0.2])
    with torch.no_grad():
        policy(x, network_timestep(sigma), cond.prompt_embeds, cond.attention_mask, cond.pooled)
        prm(x, sigma, cond)
    assert seen["tokens"].shape == (2, T * H * W, 16)
    torch.testing.assert_close(seen["pooled_input"], seen["tokens"])


def test_network_sees_timestep_int_1000_sigma_and_zero_for_clean_latents(prm: LatentPRM) -> None:
    seen: list[torch.Tensor] = []
    handle = prm.backbone.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    try:
        prm.score(latents(3), torch.tensor([0.5357, 1.0, 0.0]), tiny_cond(3))
    finally:
        handle.remove()
    assert seen[0].tolist() == [535, 1000, 0]


def test_score_and_grad_matches_central_finite_differences_in_double_precision() -> None:
    prm64 = LatentPRM.from_policy(tiny_policy(), 1, 1).double().eval()
    x, cond, sigma = latents(2, dtype=torch.float64), tiny_cond(2).to(dtype=torch.float64), torch.tensor([0.6, 0.3])
    scores, grad = prm64.score_and_grad(x, sigma, cond)
    assert grad.shape == x.shape and grad.dtype == torch.float64
    torch.testing.assert_close(scores, prm64.score(x, sigma, cond))
    g = torch.Generator().manual_seed(5)
    # diffusers applies the rotary embedding in fp32 even for fp64 models, so the forward has fp32 round-off
    # (~1e-8 relative): ε = 1e-3 keeps that below the O(ε²) truncation error, both well under the tolerance.
    eps = 1e-3
    for _ in range(3):  # random directions: d/dε score(x + ε·u) = <grad, u> per sample
        u = torch.randn(x.shape, generator=g, dtype=torch.float64)
        fd = (prm64.score(x + eps * u, sigma, cond) - prm64.score(x - eps * u, sigma, cond)) / (2 * eps)
        analytic = (grad * u).flatten(1).sum(1)
        torch.testing.assert_close(analytic, fd, rtol=1e-4, atol=1e-8)
    for idx in [(0, 0, 0, 0, 0), (1, 3, 1, 2, 3)]:  # single coordinates
        e = torch.zeros_like(x)
        e[idx] = 1.0
        fd = (prm64.score(x + eps * e, sigma, cond) - prm64.score(x - eps * e, sigma, cond)) / (2 * eps)
        torch.testing.assert_close(fd[idx[0]], grad[idx], rtol=1e-4, atol=1e-8)


def test_gradient_is_per_sample_so_batching_does_not_mix_samples(prm: LatentPRM) -> None:
    x, cond, sigma = latents(3), tiny_cond(3), torch.tensor([0.9, 0.5, 0.1])
    _, grad = prm.score_and_grad(x, sigma, cond)
    for i in range(3):
        _, alone = prm.score_and_grad(x[i : i + 1], sigma[i : i + 1], cond.index([i]))
        torch.testing.assert_close(grad[i : i + 1], alone, rtol=1e-4, atol=1e-6)
    scores, _ = prm.score_and_grad(x, sigma, cond)
    chunked_scores, chunked = prm.score_and_grad_in_chunks(x, sigma, cond, micro_batch=2)  # chunks of 2 and 1
    torch.testing.assert_close(chunked, grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(chunked_scores, scores, rtol=1e-4, atol=1e-6)


def test_bf16_weights_give_an_fp32_gradient_close_to_the_fp32_one(prm: LatentPRM) -> None:
    x, cond, sigma = latents(2), tiny_cond(2), torch.tensor([0.5, 0.2])
    _, g32 = prm.score_and_grad(x, sigma, cond)
    bf16 = LatentPRM.from_policy(tiny_policy(), 1, 1)
    bf16.load_state_dict(prm.state_dict())
    bf16 = bf16.to(torch.bfloat16).eval()
    scores, g16 = bf16.score_and_grad(x, sigma, cond)
    assert scores.dtype == torch.float32 and g16.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(g16.flatten(1), g32.flatten(1), dim=1)
    assert (cosine > 0.97).all(), cosine
    assert all(p.grad is None for p in bf16.parameters())


def test_sigmoid_output_is_the_logistic_of_the_raw_score_with_the_chain_rule_gradient(prm: LatentPRM) -> None:
    x, cond, sigma = latents(2), tiny_cond(2), torch.tensor([0.5, 0.2])
    raw, g_raw = prm.score_and_grad(x, sigma, cond)
    prm.use_sigmoid = True
    try:
        prob, g_prob = prm.score_and_grad(x, sigma, cond)
    finally:
        prm.use_sigmoid = False
    torch.testing.assert_close(prob, torch.sigmoid(raw))
    dsig = (torch.sigmoid(raw) * (1 - torch.sigmoid(raw))).reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(g_prob, dsig * g_raw)


def test_save_and_load_round_trip_gives_identical_scores_and_gradients(prm: LatentPRM, tmp_path: Path) -> None:
    prm.label = {"kind": "score", "mean": 0.5, "std": 0.1}
    prm.save_pretrained(tmp_path / "prm")
    assert sorted(p.name for p in (tmp_path / "prm").iterdir()) == ["config.json", "model.safetensors"]
    loaded = LatentPRM.from_pretrained(tmp_path / "prm", device="cpu", dtype=torch.float32)
    x, cond, sigma = latents(3), tiny_cond(3), torch.tensor([0.8, 0.3, 0.0])
    s0, g0 = prm.score_and_grad(x, sigma, cond)
    s1, g1 = loaded.score_and_grad(x, sigma, cond)
    assert torch.equal(s0, s1) and torch.equal(g0, g1)
    assert loaded.label == {"kind": "score", "mean": 0.5, "std": 0.1}
    assert json.loads((tmp_path / "prm" / "config.json").read_text())["backbone"]["num_layers"] == 1


def test_guidance_embedding_policies_are_supported_and_their_value_is_saved(tmp_path: Path) -> None:
    prm = LatentPRM.from_policy(tiny_policy(guidance_embeds=True), 1, 0, embedded_guidance=6018.0).eval()
    x, cond = latents(2), tiny_cond(2)
    before = prm.score(x, 0.5, cond)
    prm.save_pretrained(tmp_path)
    again = LatentPRM.from_pretrained(tmp_path)
    assert again.embedded_guidance == 6018.0
    torch.testing.assert_close(again.score(x, 0.5, cond), before)


def test_save_is_atomic_and_leaves_no_temporary_files(prm: LatentPRM, tmp_path: Path) -> None:
    prm.save_pretrained(tmp_path)
    prm.save_pretrained(tmp_path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


# ------------------------------------------------------------------------------------------- bad input
def test_missing_folder_or_files_name_what_is_missing(prm: LatentPRM, tmp_path: Path) -> None:
    with pytest.raises(PRMLoadError, match="PRM folder not found: .*nowhere"):
        LatentPRM.from_pretrained(tmp_path / "nowhere")
    prm.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(PRMLoadError, match="has no model.safetensors"):
        LatentPRM.from_pretrained(tmp_path)


def test_corrupted_safetensors_names_the_file(prm: LatentPRM, tmp_path: Path) -> None:
    prm.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated download
    with pytest.raises(PRMLoadError, match=r"model\.safetensors is not a readable safetensors file"):
        LatentPRM.from_pretrained(tmp_path)
    weights.write_bytes(b"\x00" * 64)  # garbage header
    with pytest.raises(PRMLoadError, match=r"model\.safetensors"):
        LatentPRM.from_pretrained(tmp_path)


def test_weights_that_do_not_match_the_config_name_the_keys(prm: LatentPRM, tmp_path: Path) -> None:
    wider = LatentPRM.from_policy(tiny_policy(), 2, 1, head_hidden=7)
    wider.save_pretrained(tmp_path / "wide")
    prm.save_pretrained(tmp_path / "mixed")
    (tmp_path / "wide" / "model.safetensors").replace(tmp_path / "mixed" / "model.safetensors")
    with pytest.raises(PRMLoadError) as err:
        LatentPRM.from_pretrained(tmp_path / "mixed")
    text = str(err.value)
    assert "model.safetensors does not match its config.json" in text
    assert "unexpected keys [backbone.transformer_blocks.1." in text
    assert "head.1.weight: file (7, 32) vs config (16, 32)" in text


def test_invalid_or_foreign_config_json_is_reported(prm: LatentPRM, tmp_path: Path) -> None:
    prm.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PRMLoadError, match=r"config\.json is not valid JSON"):
        LatentPRM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "HunyuanVideoTransformer3DModel"}))
    with pytest.raises(PRMLoadError, match="not a LatentPRM config"):
        LatentPRM.from_pretrained(tmp_path)


def test_inconsistent_inputs_are_rejected_with_the_shapes(prm: LatentPRM) -> None:
    with pytest.raises(ValueError, match="text conditioning has 2 rows for 3 latents"):
        prm.score(latents(3), 0.5, tiny_cond(2))
    with pytest.raises(ValueError, match="sigma has 2 values for 3 latents"):
        prm.score(latents(3), torch.tensor([0.1, 0.2]), tiny_cond(3))
    with pytest.raises(ValueError, match=r"latents must be \(B, C, T, h, w\)"):
        prm.score(torch.zeros(3, C, H, W), 0.5, tiny_cond(3))


def test_committed_toy_prm_fits_the_committed_toy_policy() -> None:
    """euphonium_ray/toy/assets/prm must load and score latents of the committed toy model's shape and widths."""
    assets = Path(__file__).resolve().parents[1] / "euphonium_ray" / "toy" / "assets"
    prm = LatentPRM.from_pretrained(assets / "prm")
    policy_cfg = json.loads((assets / "toy-model" / "transformer" / "config.json").read_text())
    for key in ("in_channels", "num_attention_heads", "attention_head_dim", "text_embed_dim", "pooled_projection_dim",
                "patch_size", "guidance_embeds"):
        assert prm.config["backbone"][key] == policy_cfg[key], key
    toy = json.loads((assets / "toy-model" / "toy_config.json").read_text())
    side = toy["size"] // toy["latent_factor"]
    x = torch.randn(2, policy_cfg["in_channels"], toy["frames"], side, side)
    cond = TextConditioning(torch.randn(2, toy["text_max_tokens"], toy["text_dim"]),
                            torch.ones(2, toy["text_max_tokens"], dtype=torch.int64), torch.randn(2, toy["pooled_dim"]))
    scores, grad = prm.score_and_grad(x, torch.tensor([0.5, 0.2]), cond)
    assert torch.isfinite(scores).all() and grad.shape == x.shape and float(grad.abs().sum()) > 0
    assert prm.label["kind"] == "score" and prm.label["orm"] == "toy"
