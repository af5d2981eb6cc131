"""Random-init model folders at full size (or tiny, for a CPU check), written in the layouts the real ones have.

What ``bench/gpu_fullsize.py`` trains against: a HunyuanVideo folder (diffusers ``HunyuanVideoTransformer3DModel``
at its default config, optionally fewer blocks, built straight on the device in bf16 and written once in bf16;
``AutoencoderKLHunyuanVideo`` at its default config), a latent PRM from the policy's first dual-stream blocks, an
InternVL-architecture SoliReward-style ORM, and random prompt embeddings in upstream's ``videos2caption.json``
layout (no text encoder is needed to train). Each builder returns what it cost: parameters, bytes, seconds to
build and to write.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["ORM_SIZES", "TINY_TRANSFORMER", "build_orm", "build_policy_folder", "build_prm", "write_embeddings"]

TINY_TRANSFORMER = dict(
    in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2,
    num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
    pooled_projection_dim=16, rope_axes_dim=(4, 6, 6),
)

# InternVL3-1B's shape (InternViT-300M-448px + Qwen2.5-0.5B, as OpenGVLab's -hf release): what upstream's
# physics-deformity SoliReward checkpoint is built on; "tiny" is a CPU check of the same code.
ORM_SIZES: dict[str, dict[str, Any]] = {
    "internvl3-1b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=448, patch_size=14, layer_scale_init_value=0.1),
        text=dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, vocab_size=151674, max_position_embeddings=32768,
                  rope_theta=1000000.0, tie_word_embeddings=True),
        head_layers=[6, 12, 18, 24], num_frames=8, image_size=448),
    "tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    image_size=56, patch_size=14),
        text=dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096),
        head_layers=[1, 2, 3], num_frames=4, image_size=56),
}
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fsync_folder(path: Path) -> None:
    """Flush the folder's files to disk, so the write time includes the disk and not only the page cache."""
    import os

    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _write_timed(path: Path, write: Callable[[], Any]) -> dict[str, float]:
    t0 = time.perf_counter()
    write()
    _fsync_folder(path)
    seconds = time.perf_counter() - t0
    nbytes = _folder_bytes(path)
    return {"write_s": seconds, "bytes": nbytes, "write_gib_per_s": nbytes / 2**30 / max(seconds, 1e-9)}


# ------------------------------------------------------------------------------------------------- policy
def build_transformer(config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """A random-init ``HunyuanVideoTransformer3DModel`` built straight in ``dtype`` on ``device`` (no fp32 copy of
    13 B parameters), frozen, in eval mode."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = HunyuanVideoTransformer3DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    transformer.requires_grad_(False)
    transformer.eval()
    return transformer


def build_policy_folder(root: Path, device: torch.device, *, tiny: bool, layers: int | None,
                        single_layers: int | None, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """``root/transformer`` (bf16, random init, built on ``device``) and ``root/vae`` (fp32) written to disk.
    Returns the transformer (still on ``device``; the PRM is cut from it) and the cost report."""
    from diffusers import AutoencoderKLHunyuanVideo

    config = dict(TINY_TRANSFORMER if tiny else {})
    if layers is not None:
        config["num_layers"] = layers
    if single_layers is not None:
        config["num_single_layers"] = single_layers
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    transformer = build_transformer(config, device, dtype, seed)
    _sync(device)
    report: dict[str, Any] = {"build_s": time.perf_counter() - t0, "dtype": str(dtype).replace("torch.", ""),
                              "parameters": sum(p.numel() for p in transformer.parameters()),
                              "num_layers": transformer.config.num_layers,
                              "num_single_layers": transformer.config.num_single_layers}
    report["bytes_per_dual_block"] = sum(p.numel() * p.element_size()
                                         for p in transformer.transformer_blocks[0].parameters())
    if transformer.config.num_single_layers:
        report["bytes_per_single_block"] = sum(p.numel() * p.element_size()
                                               for p in transformer.single_transformer_blocks[0].parameters())
    report.update(_write_timed(root / "transformer", lambda: transformer.save_pretrained(root / "transformer")))
    torch.manual_seed(seed + 1)
    t0 = time.perf_counter()
    vae = (AutoencoderKLHunyuanVideo(latent_channels=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                     norm_num_groups=4) if tiny else AutoencoderKLHunyuanVideo())
    vae_report: dict[str, Any] = {"build_s": time.perf_counter() - t0,
                                  "parameters": sum(p.numel() for p in vae.parameters())}
    vae_report.update(_write_timed(root / "vae", lambda: vae.save_pretrained(root / "vae")))
    report["vae"] = vae_report
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "HunyuanVideoPipeline", "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLHunyuanVideo"]}, indent=2))
    return transformer, report


def build_prm(path: Path, transformer: Any, blocks: int) -> dict[str, Any]:
    """A latent PRM of the policy's embeddings and first ``blocks`` dual-stream blocks (``registry.PRMS``), saved."""
    from euphonium_ray.registry import PRMS

    t0 = time.perf_counter()
    param = next(transformer.parameters())
    previous = torch.get_default_dtype()
    torch.set_default_dtype(param.dtype)  # built beside the policy, in its dtype (bf16 on GPU): saved as it runs
    try:
        with torch.device(param.device):
            prm = PRMS.component_class("latent").from_policy(transformer, num_dual_blocks=blocks,
                                                             num_single_blocks=0)
    finally:
        torch.set_default_dtype(previous)
    report: dict[str, Any] = {"build_s": time.perf_counter() - t0, "dual_blocks": blocks,
                              "parameters": sum(p.numel() for p in prm.parameters())}
    report.update(_write_timed(path, lambda: prm.save_pretrained(path)))
    return report


# ---------------------------------------------------------------------------------------------------- ORM
def _tokenizer():
    """A byte-level BPE Qwen2 tokenizer trained in code, with the special tokens InternVL's prompt uses (the real
    vocabulary cannot be downloaded here; the model's embedding keeps the real vocabulary size)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    corpus = ["good bad video frame physics prompt assess deformity quality motion answer check pass fail"] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=spec["vocab"], merges=[tuple(m) for m in spec["merges"]],
                         extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                               "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    tok.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>"]}, replace_extra_special_tokens=False)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_orm(path: Path, size: str, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """A SoliReward-style ORM (transformers' InternVL + HPQA head) of ``ORM_SIZES[size]``, random init, saved."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from euphonium_ray.models.orm_solireward import HPQAHead, RewardHeadConfig
    from euphonium_ray.registry import ORMS

    spec = ORM_SIZES[size]
    tok = _tokenizer()
    text = dict(spec["text"])
    text["vocab_size"] = max(text["vocab_size"], len(tok))
    vision = dict(spec["vision"])
    side = vision["image_size"] // vision["patch_size"]
    config = InternVLConfig(vision_config=vision, text_config=text,
                            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                            image_seq_length=int(side * side * 0.25))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.device(device):
        model = InternVLForConditionalGeneration(config).to(dtype)
        head_config = RewardHeadConfig(hidden_size=text["hidden_size"], layers=spec["head_layers"], num_heads=8,
                                       num_frames=spec["num_frames"], image_size=spec["image_size"])
        head = HPQAHead(head_config)
    orm = ORMS.component_class("solireward")(model, tok, head, head_config)  # writes the checkpoint layout
    _sync(device)
    report: dict[str, Any] = {"size": size, "build_s": time.perf_counter() - t0,
                              "parameters": sum(p.numel() for p in model.parameters()),
                              "head_parameters": sum(p.numel() for p in head.parameters()),
                              "num_frames": spec["num_frames"], "image_size": spec["image_size"],
                              "tokens_per_frame": config.image_seq_length}
    report.update(_write_timed(path, lambda: orm.save_pretrained(path)))
    return report


# ------------------------------------------------------------------------------------------------- prompts
def write_embeddings(out: Path, count: int, tokens: int, text_dim: int, seed: int = 0) -> Path:
    """``count`` random prompt embeddings ((1+L, D) with the pooled vector in row 0, as upstream stores them) and
    masks (a caption of half the tokens, the rest padding), and their ``videos2caption.json``."""
    from euphonium_ray.preprocess import EMBED_DIR, INDEX_FILE, MASK_DIR, write_batch, write_json

    (out / EMBED_DIR).mkdir(parents=True, exist_ok=True)
    (out / MASK_DIR).mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(count, 1 + tokens, text_dim, generator=g).to(torch.float16)
    masks = torch.zeros(count, tokens, dtype=torch.long)
    masks[:, : max(1, tokens // 2)] = 1
    write_batch(out, list(range(count)), embeds, masks)
    captions = [f"random prompt {i}" for i in range(count)]
    write_json(out / INDEX_FILE, [{"prompt_embed_path": str(out / EMBED_DIR / f"{i}.pt"),
                                   "prompt_attention_mask": str(out / MASK_DIR / f"{i}.pt"), "caption": c}
                                  for i, c in enumerate(captions)])
    return out / INDEX_FILE
