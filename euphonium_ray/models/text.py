"""HunyuanVideo's two text encoders, used the way upstream's preprocessing uses them.

The LLM (``text_encoder/``, a Llama-class model; upstream: the language model of LLaVA-Llama-3-8B) reads the prompt
wrapped in a video-description template; we keep its hidden states two layers before the last (no final norm),
drop the template tokens and keep ``max_tokens`` (256) rows. CLIP (``text_encoder_2/``) gives a pooled vector that
upstream stores, zero-padded to the LLM width, as row 0 of a (1 + max_tokens, D) tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from euphonium_ray.errors import EuphoniumError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Our own wording of a video-description system prompt, in the Llama-3 chat format upstream's template uses.
# The number of tokens to crop is measured from the tokenizer (see ``template_crop_length``), so a user who
# passes upstream's exact template text gets upstream's crop (95 tokens for the real tokenizer) without a constant.
VIDEO_PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\n"
    "Write a thorough description of the video covering: 1. its main subject and theme; "
    "2. the colours, shapes, sizes, textures, counts, text and relative positions of the objects; "
    "3. the actions, events and motions of the objects as time passes; "
    "4. the setting, lighting, style and mood; "
    "5. the camera viewpoint, movement and cuts:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
TEMPLATE_SPECIAL_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
MAX_TOKENS = 256  # upstream: 256 LLM rows after the crop
CLIP_MAX_LENGTH = 77
HIDDEN_LAYERS_TO_SKIP = 2  # upstream: hidden_states[-3]

TEXT_SUBFOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


class TextEncoderError(EuphoniumError, ValueError):
    """A text-encoder folder or template that cannot be used; the message names the path or the problem."""


def template_crop_length(tokenizer, template: str) -> int:
    """How many leading tokens (BOS included) the template adds before the prompt; they are cropped away.

    Measured by tokenising the part of the template before ``{}``. It is checked against a full encoding so that
    a tokenizer that merges across the boundary is reported instead of silently cropping one token off.
    """
    if template.count("{}") != 1:
        raise TextEncoderError("the prompt template must contain exactly one '{}' placeholder for the prompt")
    prefix = template.split("{}")[0]
    prefix_ids = tokenizer(prefix, add_special_tokens=True)["input_ids"]
    probe_ids = tokenizer(template.format("probe"), add_special_tokens=True)["input_ids"]
    if list(probe_ids[: len(prefix_ids)]) != list(prefix_ids):
        raise TextEncoderError(
            "the tokenizer merges the template's prefix with the prompt, so the template tokens cannot be "
            "cropped cleanly; end the part before '{}' with a separator (e.g. a newline)"
        )
    return len(prefix_ids)


@dataclass
class PromptWindow:
    """What of one prompt the encoders' windows hold: ``caption`` is the text the LLM rows encode (the whole prompt
    unless it was cut), ``dropped`` its tokens beyond ``max_tokens``; ``clip_dropped`` the same for CLIP's 77."""

    caption: str
    tokens: int
    dropped: int
    clip_tokens: int
    clip_dropped: int


def _prompt_token_ends(tokenizer, template: str, prompt: str) -> list[int]:
    """For every token of the templated text that comes from the prompt, the end of its span within the prompt;
    tokens of the template itself are left out (they are matched by character offsets)."""
    start = len(template.split("{}")[0])
    encoded = tokenizer(template.format(prompt), add_special_tokens=True, return_offsets_mapping=True, verbose=False)
    return [(min(end, start + len(prompt)) - start) if start <= lo < start + len(prompt) and end > lo else -1
            for lo, end in encoded["offset_mapping"]]


def prompt_windows(tokenizer, tokenizer_2, prompts: list[str], *, template: str = VIDEO_PROMPT_TEMPLATE,
                   max_tokens: int = MAX_TOKENS, clip_max_length: int = CLIP_MAX_LENGTH) -> list[PromptWindow]:
    """How much of each prompt fits the LLM's ``max_tokens`` rows after the template crop and CLIP's window, from
    the tokenizers alone (no model runs). Needs fast tokenizers (character offsets)."""
    crop = template_crop_length(tokenizer, template)
    clip_specials = len(tokenizer_2("", add_special_tokens=True)["input_ids"])
    windows = []
    for prompt in prompts:
        if getattr(tokenizer, "is_fast", False):
            ends = _prompt_token_ends(tokenizer, template, prompt)
            in_prompt = [end for end in ends if end >= 0]
            kept = [end for pos, end in enumerate(ends) if end >= 0 and crop <= pos < crop + max_tokens]
            caption = prompt if len(kept) == len(in_prompt) else prompt[: max(kept, default=0)].rstrip()
        else:  # a slow tokenizer has no offsets: tokenise the prompt alone and decode what fits
            ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
            in_prompt, kept = ids, ids[:max_tokens]
            caption = prompt if len(kept) == len(ids) else tokenizer.decode(kept, skip_special_tokens=True).strip()
        clip_tokens = len(tokenizer_2(prompt, add_special_tokens=False, verbose=False)["input_ids"])
        windows.append(PromptWindow(caption, len(in_prompt), len(in_prompt) - len(kept), clip_tokens,
                                    max(0, clip_tokens - (clip_max_length - clip_specials))))
    return windows


def load_tokenizers(path: str | Path):
    """``tokenizer/`` and ``tokenizer_2/`` of a model folder (the LLM's and CLIP's)."""
    from transformers import AutoTokenizer

    root = Path(path)
    if not root.is_dir():
        raise TextEncoderError(f"model folder not found: {root}")
    return (AutoTokenizer.from_pretrained(_require_dir(root, "tokenizer")),
            AutoTokenizer.from_pretrained(_require_dir(root, "tokenizer_2")))


@dataclass
class EncodedPrompts:
    """A batch in upstream's stored layout: ``prompt_embed`` (B, 1+L, D) with the CLIP vector in row 0, and the
    LLM attention mask (B, L) of 0/1 integers."""

    prompt_embed: Tensor
    attention_mask: Tensor


def _require_dir(root: Path, sub: str) -> Path:
    path = root / sub
    if not path.is_dir():
        raise TextEncoderError(f"text encoder folder {root} has no {sub}/ (expected {path})")
    return path


def _load_llm(path: Path, dtype: torch.dtype):
    """The LLM's decoder stack (a causal-LM checkpoint loads into its base model; a LLaVA-style wrapper gives its
    language model)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=dtype)
    if getattr(config, "text_config", None) is not None and hasattr(model, "language_model"):
        model = model.language_model
    return model


class HunyuanTextEncoder:
    """Encodes prompts into upstream's (1+L, D) embedding + (L,) mask layout."""

    def __init__(
        self,
        tokenizer,
        text_encoder,
        tokenizer_2,
        text_encoder_2,
        *,
        template: str = VIDEO_PROMPT_TEMPLATE,
        max_tokens: int = MAX_TOKENS,
        clip_max_length: int = CLIP_MAX_LENGTH,
    ) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval()
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2.eval()
        self.template = template
        self.max_tokens = int(max_tokens)
        self.clip_max_length = int(clip_max_length)
        if self.tokenizer.pad_token is None:  # Llama-3 tokenizers ship without one; the mask hides it anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.crop = template_crop_length(self.tokenizer, template)
        self.hidden_dim = int(self.text_encoder.config.hidden_size)
        self.pooled_dim = int(self.text_encoder_2.config.hidden_size)
        if self.pooled_dim > self.hidden_dim:
            raise TextEncoderError(
                f"CLIP width {self.pooled_dim} exceeds the LLM width {self.hidden_dim}: the pooled vector cannot be "
                "stored in row 0 of the embedding"
            )
        layers = int(self.text_encoder.config.num_hidden_layers)
        if layers <= HIDDEN_LAYERS_TO_SKIP:
            raise TextEncoderError(f"the LLM has {layers} layers; need more than {HIDDEN_LAYERS_TO_SKIP}")

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        template: str = VIDEO_PROMPT_TEMPLATE,
        max_tokens: int = MAX_TOKENS,
    ) -> "HunyuanTextEncoder":
        """Load ``text_encoder/``, ``tokenizer/``, ``text_encoder_2/`` and ``tokenizer_2/`` from a model folder."""
        from transformers import AutoTokenizer, CLIPTextModel

        root = Path(path)
        if not root.is_dir():
            raise TextEncoderError(f"model folder not found: {root}")
        dirs = {sub: _require_dir(root, sub) for sub in TEXT_SUBFOLDERS}
        tokenizer = AutoTokenizer.from_pretrained(dirs["tokenizer"])
        tokenizer_2 = AutoTokenizer.from_pretrained(dirs["tokenizer_2"])
        llm = _load_llm(dirs["text_encoder"], dtype).to(device)
        clip = CLIPTextModel.from_pretrained(dirs["text_encoder_2"], dtype=dtype).to(device)
        return cls(tokenizer, llm, tokenizer_2, clip, template=template, max_tokens=max_tokens)

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @torch.no_grad()
    def encode_llm(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """LLM hidden states at ``hidden_states[-3]`` without the template rows: (B, L, D) and mask (B, L)."""
        text = [self.template.format(p) for p in prompts]
        batch = self.tokenizer(
            text,
            max_length=self.max_tokens + self.crop,
            padding="max_length",
            truncation=True,
            padding_side="right",
            return_tensors="pt",
        )
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        out = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-(HIDDEN_LAYERS_TO_SKIP + 1)]
        return hidden[:, self.crop :], mask[:, self.crop :].to(torch.int64)

    @torch.no_grad()
    def encode_clip(self, prompts: list[str]) -> Tensor:
        """CLIP ``pooler_output`` (B, P) of the prompts, 77 tokens, padded/truncated."""
        batch = self.tokenizer_2(
            prompts,
            max_length=self.clip_max_length,
            padding="max_length",
            truncation=True,
            padding_side="right",
            return_tensors="pt",
        )
        out = self.text_encoder_2(
            input_ids=batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device)
        )
        return out.pooler_output

    def encode(self, prompts: list[str], *, out_dtype: torch.dtype = torch.float16) -> EncodedPrompts:
        """Both encoders in upstream's stored layout; embeddings in ``out_dtype`` (upstream: fp16), mask int64."""
        if not prompts:
            raise TextEncoderError("no prompts to encode")
        hidden, mask = self.encode_llm(prompts)
        pooled = self.encode_clip(prompts)
        row0 = torch.zeros(len(prompts), 1, self.hidden_dim, dtype=hidden.dtype, device=hidden.device)
        row0[:, 0, : self.pooled_dim] = pooled.to(hidden.dtype)
        embed = torch.cat([row0, hidden], dim=1).to(out_dtype).cpu()
        return EncodedPrompts(prompt_embed=embed, attention_mask=mask.cpu())
