"""Build tiny HunyuanVideo-layout model folders with the real classes, for tests and the toy world.

Weights cannot be downloaded here, so every test model is made in code at a tiny config, written with
``save_pretrained`` in the layout a user's real folder has, and then loaded back through the same path a user's
folder goes through. Nothing here is used when loading a real model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch

from euphonium_ray.models.text import TEMPLATE_SPECIAL_TOKENS, VIDEO_PROMPT_TEMPLATE

LLM_SPECIALS = {"unk": "<unk>", "pad": "<pad>", "bos": "<|begin_of_text|>", "eos": "<|end_of_text|>"}
CLIP_SPECIALS = {"unk": "<|unk|>", "bos": "<|startoftext|>", "eos": "<|endoftext|>"}


def tiny_transformer_config(
    *,
    in_channels: int = 4,
    text_dim: int = 32,
    pooled_dim: int = 16,
    num_attention_heads: int = 2,
    attention_head_dim: int = 8,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_refiner_layers: int = 1,
    patch_size: int = 1,
    patch_size_t: int = 1,
    guidance_embeds: bool = True,
    rope_axes_dim: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``HunyuanVideoTransformer3DModel`` at a size a CPU runs in milliseconds."""
    if rope_axes_dim is None:
        quarter = attention_head_dim // 4
        rope_axes_dim = (quarter, quarter, attention_head_dim - 2 * quarter)
    if sum(rope_axes_dim) != attention_head_dim or any(d % 2 for d in rope_axes_dim):
        raise ValueError(f"rope_axes_dim {rope_axes_dim} must be even and sum to attention_head_dim={attention_head_dim}")
    return dict(
        in_channels=in_channels,
        out_channels=in_channels,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        num_refiner_layers=num_refiner_layers,
        mlp_ratio=2.0,
        patch_size=patch_size,
        patch_size_t=patch_size_t,
        qk_norm="rms_norm",
        guidance_embeds=guidance_embeds,
        text_embed_dim=text_dim,
        pooled_projection_dim=pooled_dim,
        rope_theta=256.0,
        rope_axes_dim=tuple(rope_axes_dim),
    )


def build_tiny_transformer(out_dir: str | Path, *, seed: int = 0, **config: Any) -> Path:
    """Save a random tiny ``HunyuanVideoTransformer3DModel`` to ``out_dir`` (config.json + safetensors)."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(**tiny_transformer_config(**config))
    model.save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_vae(out_dir: str | Path, *, latent_channels: int = 4, width: int = 8, seed: int = 0) -> Path:
    """Save a random tiny ``AutoencoderKLHunyuanVideo`` (8× spatial, 4× causal temporal compression, as upstream)."""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=latent_channels,
        block_out_channels=(width,) * 4,
        layers_per_block=1,
        norm_num_groups=min(4, width),
    )
    vae.save_pretrained(out_dir)
    return Path(out_dir)


# --------------------------------------------------------------------------------------------- tokenizers
def _words_of(texts: Iterable[str]) -> list[str]:
    """The tokens a lowercase WordLevel tokenizer with the whitespace pre-tokenizer sees in ``texts``."""
    from tokenizers.pre_tokenizers import Whitespace

    pre = Whitespace()
    seen: dict[str, None] = {}
    for text in texts:
        for special in TEMPLATE_SPECIAL_TOKENS + tuple(LLM_SPECIALS.values()):
            text = text.replace(special, " ")
        for piece, _ in pre.pre_tokenize_str(text.lower().replace("{}", " ")):
            seen.setdefault(piece, None)
    return list(seen)


def _word_level_tokenizer(words: list[str], specials: list[str], bos: str, eos: str | None):
    """A lowercase WordLevel tokenizer over ``words`` that adds ``bos`` (and ``eos``) around every text."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {tok: i for i, tok in enumerate(specials + [w for w in words if w not in specials])}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=specials[0]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    single = f"{bos} $A" + (f" {eos}" if eos else "")
    markers = [(bos, vocab[bos])] + ([(eos, vocab[eos])] if eos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=markers)
    return tok, vocab


def build_tiny_tokenizers(out_dir: str | Path, vocab_words: Iterable[str], *, template: str = VIDEO_PROMPT_TEMPLATE,
                          llm_max_length: int = 512) -> dict[str, int]:
    """Write ``tokenizer/`` (Llama-style: BOS, chat markers, pad) and ``tokenizer_2/`` (CLIP-style: BOS … EOS).

    The vocabulary is the prompt words plus the template's words, so the template never maps to <unk>.
    Returns the ids the text models' configs need.
    """
    from transformers import PreTrainedTokenizerFast

    root = Path(out_dir)
    words = _words_of(list(vocab_words) + [template])
    llm_specials = [LLM_SPECIALS["unk"], LLM_SPECIALS["pad"], LLM_SPECIALS["bos"], LLM_SPECIALS["eos"],
                    *TEMPLATE_SPECIAL_TOKENS]
    tok, vocab = _word_level_tokenizer(words, llm_specials, LLM_SPECIALS["bos"], None)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=LLM_SPECIALS["unk"], pad_token=LLM_SPECIALS["pad"],
        bos_token=LLM_SPECIALS["bos"], eos_token=LLM_SPECIALS["eos"], model_max_length=llm_max_length,
        padding_side="right",
    ).save_pretrained(root / "tokenizer")

    clip_specials = [CLIP_SPECIALS["unk"], CLIP_SPECIALS["bos"], CLIP_SPECIALS["eos"]]
    tok2, vocab2 = _word_level_tokenizer(words, clip_specials, CLIP_SPECIALS["bos"], CLIP_SPECIALS["eos"])
    PreTrainedTokenizerFast(
        tokenizer_object=tok2, unk_token=CLIP_SPECIALS["unk"], pad_token=CLIP_SPECIALS["eos"],
        bos_token=CLIP_SPECIALS["bos"], eos_token=CLIP_SPECIALS["eos"], model_max_length=77, padding_side="right",
    ).save_pretrained(root / "tokenizer_2")
    return {
        "llm_vocab": len(vocab), "llm_pad": vocab[LLM_SPECIALS["pad"]], "llm_bos": vocab[LLM_SPECIALS["bos"]],
        "llm_eos": vocab[LLM_SPECIALS["eos"]], "clip_vocab": len(vocab2), "clip_bos": vocab2[CLIP_SPECIALS["bos"]],
        "clip_eos": vocab2[CLIP_SPECIALS["eos"]],
    }


def build_tiny_text_side(
    out_dir: str | Path,
    vocab_words: Iterable[str],
    *,
    text_dim: int = 32,
    pooled_dim: int = 16,
    llm_layers: int = 3,
    causal_lm: bool = False,
    template: str = VIDEO_PROMPT_TEMPLATE,
    seed: int = 0,
) -> dict[str, int]:
    """Write ``tokenizer/``, ``text_encoder/`` (tiny Llama), ``tokenizer_2/`` and ``text_encoder_2/`` (tiny CLIP).

    ``text_dim`` is the LLM width D (the transformer's ``text_embed_dim``), ``pooled_dim`` the CLIP width P (its
    ``pooled_projection_dim``). ``causal_lm`` saves a ``LlamaForCausalLM`` (as a LLaVA-derived text encoder is)
    instead of a ``LlamaModel`` (as the diffusers HunyuanVideo folder has); both load the same way.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaForCausalLM, LlamaModel

    root = Path(out_dir)
    ids = build_tiny_tokenizers(root, vocab_words, template=template)
    torch.manual_seed(seed)
    llm_config = LlamaConfig(
        vocab_size=ids["llm_vocab"], hidden_size=text_dim, intermediate_size=2 * text_dim,
        num_hidden_layers=llm_layers, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=ids["llm_pad"], bos_token_id=ids["llm_bos"], eos_token_id=ids["llm_eos"],
    )
    llm = (LlamaForCausalLM if causal_lm else LlamaModel)(llm_config)
    llm.save_pretrained(root / "text_encoder")
    clip_config = CLIPTextConfig(
        vocab_size=ids["clip_vocab"], hidden_size=pooled_dim, intermediate_size=2 * pooled_dim, projection_dim=pooled_dim,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
        bos_token_id=ids["clip_bos"], eos_token_id=ids["clip_eos"], pad_token_id=ids["clip_eos"],
    )
    CLIPTextModel(clip_config).save_pretrained(root / "text_encoder_2")
    return ids


def build_tiny_hunyuan(
    out_dir: str | Path,
    vocab_words: Iterable[str],
    *,
    text_dim: int = 32,
    pooled_dim: int = 16,
    latent_channels: int = 4,
    vae_width: int = 8,
    seed: int = 0,
    **transformer_config: Any,
) -> Path:
    """A whole tiny HunyuanVideo folder in the diffusers layout: transformer/, vae/, both text encoders and
    tokenizers, and a ``model_index.json`` naming the classes as the diffusers pipeline folder does."""
    root = Path(out_dir)
    build_tiny_transformer(root / "transformer", seed=seed, in_channels=latent_channels, text_dim=text_dim,
                           pooled_dim=pooled_dim, **transformer_config)
    build_tiny_vae(root / "vae", latent_channels=latent_channels, width=vae_width, seed=seed)
    build_tiny_text_side(root, vocab_words, text_dim=text_dim, pooled_dim=pooled_dim, seed=seed)
    index = {
        "_class_name": "HunyuanVideoPipeline",
        "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLHunyuanVideo"],
        "text_encoder": ["transformers", "LlamaModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "text_encoder_2": ["transformers", "CLIPTextModel"],
        "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root
