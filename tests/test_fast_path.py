"""The policy's fast path (issue 15: ``model.unpadded_attention``, ``model.compile``, ``model.merge_lora``) on tiny
HunyuanVideo transformers built with the real diffusers class, each compared with an independent computation:
diffusers' own forward on the padded inputs, and for LoRA a plain transformer whose weights the test merges itself.
"""

from __future__ import annotations

import time

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel

from euphonium_ray.config import load_config
from euphonium_ray.errors import ConfigError
from euphonium_ray.models.base import TextConditioning
from euphonium_ray.models.hunyuan import HunyuanVideoPolicy, add_lora
from euphonium_ray.models.hunyuan_fast import shared_prompt_length
from euphonium_ray.models.tiny import tiny_transformer_config

D, P, C = 32, 16, 4


def tiny_transformer(seed: int = 0, dtype: torch.dtype = torch.float32) -> HunyuanVideoTransformer3DModel:
    torch.manual_seed(seed)
    cfg = tiny_transformer_config(in_channels=C, text_dim=D, pooled_dim=P, attention_head_dim=8, num_layers=2,
                                  num_single_layers=2)
    return HunyuanVideoTransformer3DModel(**cfg).to(dtype).eval().requires_grad_(False)


def cond_of(lengths: list[int], tokens: int = 8, seed: int = 1, same_prompt: bool = True) -> TextConditioning:
    g = torch.Generator().manual_seed(seed)
    rows = 1 if same_prompt else len(lengths)
    embeds = torch.randn(rows, tokens, D, generator=g).expand(len(lengths), -1, -1).clone() if same_prompt else \
        torch.randn(rows, tokens, D, generator=g)
    mask = torch.zeros(len(lengths), tokens, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    # padding positions hold garbage, as a real encoder's would: the mask alone must keep it out
    embeds = torch.where(mask.bool().unsqueeze(-1), embeds, 100 * torch.randn(embeds.shape, generator=g))
    return TextConditioning(embeds, mask, torch.randn(len(lengths), P, generator=g))


def diffusers_velocity(transformer, x: torch.Tensor, timesteps: list[int], cond: TextConditioning) -> torch.Tensor:
    with torch.no_grad():
        return transformer(hidden_states=x.to(transformer.dtype), timestep=torch.tensor(timesteps),
                           encoder_hidden_states=cond.prompt_embeds.to(transformer.dtype),
                           encoder_attention_mask=cond.attention_mask,
                           pooled_projections=cond.pooled.to(transformer.dtype),
                           guidance=torch.full((x.shape[0],), 6018.0), return_dict=False)[0].float()


# σ values exact in binary, so that int(1000σ) is the same integer for the policy and the direct call
def latents(batch: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, C, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ unpadded attention
def test_shared_prompt_length_only_for_equal_prefix_masks():
    def mask(rows):
        return torch.tensor(rows)

    assert shared_prompt_length(mask([[1, 1, 0], [1, 1, 0]])) == 2
    assert shared_prompt_length(mask([[1, 1, 1]])) == 3
    assert shared_prompt_length(mask([[1, 1, 0], [1, 0, 0]])) is None  # different lengths
    assert shared_prompt_length(mask([[0, 1, 1], [0, 1, 1]])) is None  # not a prefix
    assert shared_prompt_length(mask([[0, 0, 0]])) is None  # no real token


def test_unpadded_attention_cuts_the_padding_and_equals_diffusers_on_the_padded_prompt():
    transformer = tiny_transformer()
    policy = HunyuanVideoPolicy(transformer, None)
    policy.configure_speed(unpadded_attention=True)
    cond = cond_of([5, 5, 5])  # one prompt for the group: 5 real tokens of 8
    x = latents(3)
    v = policy.velocity(x, torch.tensor([0.5, 0.75, 0.875]), cond)
    assert policy.fast is not None and policy.fast.calls == {"unmasked": 1, "masked": 0}
    reference = diffusers_velocity(transformer, x, [500, 750, 875], cond)
    torch.testing.assert_close(v, reference, rtol=1e-5, atol=1e-5)
    # and the padding mattered to the reference only through the mask: a wrong cut would not match
    wrong = HunyuanVideoPolicy(transformer, None)
    wrong.configure_speed(unpadded_attention=True)
    cut_short = TextConditioning(cond.prompt_embeds, torch.cat([torch.ones(3, 4), torch.zeros(3, 4)], 1).long(),
                                 cond.pooled)
    assert not torch.allclose(wrong.velocity(x, torch.tensor([0.5, 0.75, 0.875]), cut_short), reference, atol=1e-3)


def test_rows_with_different_prompt_lengths_keep_diffusers_mask_bit_for_bit():
    transformer = tiny_transformer()
    policy = HunyuanVideoPolicy(transformer, None)
    policy.configure_speed(unpadded_attention=True)
    cond = cond_of([8, 5, 3], same_prompt=False)
    x = latents(3)
    v = policy.velocity(x, torch.tensor([0.5, 0.75, 0.875]), cond)
    assert policy.fast is not None and policy.fast.calls == {"unmasked": 0, "masked": 1}
    torch.testing.assert_close(v, diffusers_velocity(transformer, x, [500, 750, 875], cond), rtol=0, atol=0)


def test_unpadded_attention_in_bf16_is_within_rounding_of_diffusers():
    transformer = tiny_transformer(dtype=torch.bfloat16)
    reference32 = tiny_transformer(dtype=torch.float32)  # the same weights in fp32: the scale of bf16 rounding
    policy = HunyuanVideoPolicy(transformer, None)
    policy.configure_speed(unpadded_attention=True)
    cond, x = cond_of([6, 6]), latents(2)
    fast = policy.velocity(x, torch.tensor([0.625, 0.625]), cond)
    plain = diffusers_velocity(transformer, x, [625, 625], cond)
    exact = diffusers_velocity(reference32, x, [625, 625], cond)
    bf16_error = float((plain - exact).norm() / exact.norm())
    assert float((fast - plain).norm() / plain.norm()) <= max(2 * bf16_error, 1e-3)


# -------------------------------------------------------------------------------------------- compile
def counting_backend(counter: list[int]):
    def backend(gm: torch.fx.GraphModule, example_inputs):  # noqa: ARG001 - torch.compile's backend signature
        counter.append(1)
        return gm.forward
    return backend


def with_lora(transformer, rank: int = 4, seed: int = 3) -> None:
    add_lora(transformer, rank=rank, alpha=float(rank), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:  # B = 0 at init: make the adapters do something
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    transformer.requires_grad_(False)


def merged_copy(transformer) -> HunyuanVideoTransformer3DModel:
    """A plain diffusers transformer holding W0 + (alpha/r)·B·A, merged here from the state dict (not by peft and
    not by the code under test)."""
    state = transformer.state_dict()
    plain = tiny_transformer()
    merged = {}
    for key in plain.state_dict():
        base_key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        if base_key in state:
            weight = state[base_key].clone()
            if key.endswith(".weight"):
                prefix = base_key.removesuffix(".base_layer.weight")
                a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
                weight = weight + (b.double() @ a.double()).to(weight.dtype)  # alpha / r = 1
            merged[key] = weight
        else:
            merged[key] = state[key].clone()
    plain.load_state_dict(merged)
    return plain


def test_compiled_blocks_compile_once_and_survive_in_place_weight_syncs():
    transformer = tiny_transformer()
    with_lora(transformer)
    policy = HunyuanVideoPolicy(transformer, None)
    policy.configure_speed(unpadded_attention=True, compile="blocks")
    assert policy.fast is not None
    compiled: list[int] = []
    policy.fast.compile_options = {"backend": counting_backend(compiled)}
    torch._dynamo.reset()
    cond, x, sigma = cond_of([6, 6]), latents(2), torch.tensor([0.375, 0.8125])
    v = policy.velocity(x, sigma, cond)
    torch.testing.assert_close(v, diffusers_velocity(merged_copy(transformer), x, [375, 812], cond),
                               rtol=1e-4, atol=1e-5)
    first = len(compiled)
    assert first >= 1  # the blocks really went through torch.compile
    for version in range(3):  # weight syncs: new adapters copied into the live tensors
        state = {n: t + 0.05 * (version + 1) for n, t in policy.sync_state_dict().items()}
        policy.load_sync_state_dict(state)
        v = policy.velocity(x, sigma, cond)
        torch.testing.assert_close(v, diffusers_velocity(merged_copy(transformer), x, [375, 812], cond),
                                   rtol=1e-4, atol=1e-5)
    assert len(compiled) == first  # no recompilation after in-place weight updates


@pytest.mark.slow
def test_inductor_compiled_blocks_match_plain_on_cpu():
    """The real compiler (inductor, C++ on CPU) on a tiny block pair: measured 69 s on 2 shared, busy cores (over
    the 30 s a fast test may take, hence slow); the fast suite compiles through a counting backend instead."""
    transformer = tiny_transformer()
    policy = HunyuanVideoPolicy(transformer, None)
    policy.configure_speed(unpadded_attention=True, compile="blocks")
    cond, x = cond_of([7, 7]), latents(2)
    t0 = time.perf_counter()
    v = policy.velocity(x, torch.tensor([0.25, 0.25]), cond)
    first_call = time.perf_counter() - t0
    torch.testing.assert_close(v, diffusers_velocity(transformer, x, [250, 250], cond), rtol=1e-4, atol=1e-5)
    assert first_call < 300, f"inductor took {first_call:.0f} s on a tiny block"


# ------------------------------------------------------------------------------------------ merge LoRA
def test_merged_lora_equals_unmerged_adapters_and_an_independent_merge():
    transformer = tiny_transformer()
    with_lora(transformer)
    x, cond, sigma = latents(2), cond_of([8, 6], same_prompt=False), torch.tensor([0.25, 0.625])
    policy = HunyuanVideoPolicy(transformer, None)
    unmerged = policy.velocity(x, sigma, cond)
    base = {n: t.clone() for n, t in transformer.state_dict().items() if n.endswith("base_layer.weight")}
    policy.configure_speed(merge_lora=True)
    assert policy.lora_merge is not None and policy.lora_merge.merged
    merged = policy.velocity(x, sigma, cond)
    independent = diffusers_velocity(merged_copy_from(base, transformer), x, [250, 625], cond)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, independent, rtol=1e-5, atol=1e-5)
    # the saved merge adds each adapter once (W0 kept aside, not the merged weight)
    saved = policy.merged_state_dict()
    reference = merged_copy_from(base, transformer).state_dict()
    for key in ("transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.1.attn.to_v.weight"):
        torch.testing.assert_close(saved[key], reference[key], rtol=1e-6, atol=1e-6)
    policy.lora_merge.unmerge()
    for name, weight in base.items():
        assert torch.equal(transformer.state_dict()[name], weight)  # W0 restored exactly


def merged_copy_from(base: dict[str, torch.Tensor], transformer) -> HunyuanVideoTransformer3DModel:
    """``merged_copy`` with the unmerged base weights ``base`` (the live ones hold the merge)."""
    state = dict(transformer.state_dict())
    state.update(base)
    clone = tiny_transformer()
    with_lora(clone)
    clone.load_state_dict(state)
    return merged_copy(clone)


def test_merge_after_every_sync_starts_from_w0_so_bf16_weights_do_not_drift():
    transformer = tiny_transformer(dtype=torch.bfloat16)
    with_lora(transformer)
    policy = HunyuanVideoPolicy(transformer, None)
    base = {n: t.clone() for n, t in transformer.state_dict().items() if n.endswith("base_layer.weight")}
    policy.configure_speed(merge_lora=True)
    key = "transformer_blocks.0.attn.to_q"
    for version in range(5):
        state = {n: t * (1.1 + 0.1 * version) for n, t in policy.sync_state_dict().items()}
        policy.load_sync_state_dict(state)
    live = transformer.state_dict()
    a, b = live[f"{key}.lora_A.default.weight"].float(), live[f"{key}.lora_B.default.weight"].float()
    expected = (base[f"{key}.base_layer.weight"].float() + b @ a).to(torch.bfloat16)  # alpha/r = 1
    assert torch.equal(live[f"{key}.base_layer.weight"], expected)


def test_merged_lora_in_bf16_is_within_rounding_of_unmerged():
    transformer = tiny_transformer(dtype=torch.bfloat16)
    with_lora(transformer)
    x, cond, sigma = latents(2), cond_of([8, 8]), torch.tensor([0.5, 0.5])
    policy = HunyuanVideoPolicy(transformer, None)
    unmerged = policy.velocity(x, sigma, cond)
    policy.configure_speed(merge_lora=True)
    merged = policy.velocity(x, sigma, cond)
    assert float((merged - unmerged).norm() / unmerged.norm()) < 1e-2


# ------------------------------------------------------------------------------------------ config wiring
def test_speed_options_are_typed_and_reach_the_rollout_copy_only(tmp_path):
    from euphonium_ray.models.tiny import build_tiny_hunyuan
    from euphonium_ray.roles import load_policy

    with pytest.raises(ConfigError, match="model.compile"):
        load_config(None, ["model.compile=everything"], use_env=False)
    defaults = load_config(None, [], use_env=False).model
    assert (defaults.unpadded_attention, defaults.compile, defaults.merge_lora) == (True, "none", False)
    folder = build_tiny_hunyuan(tmp_path / "m", ["a red square"], text_dim=D, pooled_dim=P, latent_channels=C)
    cfg = load_config(None, [f"model.path={folder}", "model.trainable=lora", "model.lora_rank=2",
                             "model.compile=blocks", "model.merge_lora=true"], use_env=False)
    rollout = load_policy(cfg, "rollout", torch.device("cpu"))
    assert rollout.fast is not None and rollout.fast.compile_blocks and rollout.fast.unpadded_attention
    assert rollout.lora_merge is not None and rollout.lora_merge.merged
    learner = load_policy(cfg, "learner", torch.device("cpu"))
    assert learner.lora_merge is None and learner.fast is not None and learner.fast.compile_blocks
    off = load_config(None, [f"model.path={folder}", "model.unpadded_attention=false"], use_env=False)
    assert load_policy(off, "rollout", torch.device("cpu")).fast is None
