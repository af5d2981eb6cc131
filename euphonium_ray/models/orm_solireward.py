"""SoliReward-style pixel ORM: transformers' native InternVL plus a hierarchical query-attention ("HPQA") head.

The scorer reads a video the way upstream's SoliReward reward model does (digest §7.2): 8 frames at segment centres,
each one 448×448 tile with ImageNet normalisation (``frames.py``), a chat prompt "Frame1: <image>\\n…" whose image
placeholders are expanded to ``<img>`` + ``<IMG_CONTEXT>``×(tokens per tile) + ``</img>`` (what ``InternVLProcessor``
does for one tile), the LLM's hidden states, and the HPQA head: a learnable query pools the states of the first
chosen layer, cross-attends successively to the later chosen layers, is added to a second learnable query pooled
over the last layer, and an MLP maps that to one unbounded scalar (Bradley–Terry trained, not a probability).

Checkpoint folder (our layout; ``SoliRewardORM.save_pretrained`` writes it atomically)::

    config.json, model.safetensors[.index.json], generation_config.json   InternVLForConditionalGeneration.save_pretrained
    tokenizer.json, tokenizer_config.json, chat_template.jinja            the tokenizer (with <img>, </img>, <IMG_CONTEXT>)
    preprocessor_config.json                                               the frame preprocessing, as an image processor
    reward_head.safetensors                                                the HPQA head (parameter names as upstream's)
    reward_config.json                                                     RewardHeadConfig: layers, heads, frames, prompts

Upstream formats: a SoliReward checkpoint (``pixel_orm/*-HPQA-InternVL3-1B``) is an OpenGVLab *remote-code* InternVL
chat model (``InternVLChatModel``: ``vision_model.*``, ``mlp1.*``, ``language_model.*`` keys, with the head's
parameters in the same ``model.safetensors``) plus ``training_config.json``. It does not load here as is; see
docs/models.md for what converting it takes. OpenGVLab's ``*-hf`` InternVL3 releases load as the body.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor, nn

from euphonium_ray.checkpoint import CheckpointError, atomic_write_dir, read_safetensors
from euphonium_ray.models.frames import IMAGENET_MEAN, IMAGENET_STD, check_videos, internvl_pixel_values

REWARD_HEAD_FILE = "reward_head.safetensors"
REWARD_CONFIG_FILE = "reward_config.json"
HEAD_FORMAT = "euphonium-ray/solireward-hpqa"


class ORMCheckpointError(CheckpointError):
    """An ORM checkpoint folder that cannot be used; the message names the path or key."""


# ------------------------------------------------------------------------------------------------- prompts
class PromptTemplate(BaseModel):
    """One judging prompt. ``user`` may hold ``{caption}``; frames follow it as "Frame1: <image>\\n…"."""

    model_config = ConfigDict(extra="forbid")
    system: str
    user: str

    def user_text(self, caption: str) -> str:
        return self.user.replace("{caption}", caption)


_RULES = (
    "\n\nHow to answer:\n- Answer good only if every check passes.\n- Answer bad if any check fails or only partly "
    "passes.\n- Reply with that one word and nothing else.\n- Be accurate and objective.\n"
)
# Our wording of upstream's two variants (Euphonium grpo_config/constants.py; upstream writes them in Chinese).
DEFAULT_PROMPTS: dict[str, PromptTemplate] = {
    "deformity_physics": PromptTemplate(
        system="You are an expert assessor of generated video quality. Look at the video and decide whether it "
        "passes every check below:\n\n1. Does the motion obey physical laws?\n2. Are people and animals free of "
        "deformities?" + _RULES,
        user="Please assess the following video:",
    ),
    "ta": PromptTemplate(
        system="You are an expert assessor of generated video quality. Look at the video and decide whether it "
        "passes every check below:\n\n1. Does the video match the meaning of its text prompt?" + _RULES,
        user="The text prompt of the generated video is: {caption}. The video generated from this prompt is:",
    ),
}


# --------------------------------------------------------------------------------------------- head config
class RewardHeadConfig(BaseModel):
    """``reward_config.json``: the head's shape and how the scorer reads videos (frames, tile size, prompts)."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["euphonium-ray/solireward-hpqa"] = HEAD_FORMAT
    format_version: Literal[1] = 1
    head: Literal["progressive_hierarchical_attention"] = "progressive_hierarchical_attention"
    hidden_size: int = Field(ge=1)
    layers: list[int] = Field(min_length=1)  # indices into the LLM's hidden_states (0 = embeddings, -1 = last)
    num_heads: int = Field(default=8, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    num_frames: int = Field(default=8, ge=1)
    image_size: int = Field(default=448, ge=14)
    prompts: dict[str, PromptTemplate] = Field(default_factory=lambda: dict(DEFAULT_PROMPTS))

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "RewardHeadConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        return self


# -------------------------------------------------------------------------------------------------- head
class AttentionQuery(nn.Module):
    """A learnable query pooling a sequence by multi-head attention (names as upstream's ``AttentionQuery``)."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.query = nn.Embedding(1, hidden_size)
        self.attention = nn.ModuleList([nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)])

    def forward(self, seq: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        query = self.query.weight[0].expand(seq.shape[0], 1, -1)
        out, _ = self.attention[0](query, seq, seq, key_padding_mask=key_padding_mask, need_weights=False)
        return out  # (B, 1, h)


class HPQAHead(nn.Module):
    """Progressive hierarchical query attention over chosen LLM layers → one scalar per sequence."""

    def __init__(self, cfg: RewardHeadConfig) -> None:
        super().__init__()
        h, heads = cfg.hidden_size, cfg.num_heads
        self.layers = list(cfg.layers)
        self.attention_query_first_layer = AttentionQuery(h, heads)
        self.attention_query_other_layers = nn.ModuleList(
            [nn.MultiheadAttention(h, heads, batch_first=True) for _ in self.layers[1:]]
        )
        self.attention_query_final_layer = AttentionQuery(h, heads)
        self.reward_head = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Dropout(cfg.dropout), nn.Linear(h, 1, bias=False))

    def forward(self, hidden_states: Sequence[Tensor], attention_mask: Tensor) -> Tensor:
        """``hidden_states``: the LLM's (embeddings, layer 1, …, last after the final norm); mask (B, L) of real tokens."""
        pad = ~attention_mask.bool()
        query = self.attention_query_first_layer(hidden_states[self.layers[0]], pad)
        for attend, layer in zip(self.attention_query_other_layers, self.layers[1:]):
            kv = hidden_states[layer]
            query, _ = attend(query, kv, kv, key_padding_mask=pad, need_weights=False)
        pooled = query.squeeze(1) + self.attention_query_final_layer(hidden_states[-1], pad).squeeze(1)
        return self.reward_head(pooled).squeeze(-1)


# ------------------------------------------------------------------------------------------------ scorer
def image_tokens_per_tile(vision_config, downsample_ratio: float) -> int:
    """LLM tokens InternVL spends on one tile: (image_size / patch)² · downsample_ratio² (after pixel shuffle)."""
    side = vision_config.image_size[0] // vision_config.patch_size[0]
    return int(round(side * side * downsample_ratio**2))


class SoliRewardORM:
    """OutcomeRewardModel: ``score(videos (B,3,F,H,W) in [-1,1], captions) -> (B,)`` float32, batched in memory."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        head: HPQAHead,
        head_config: RewardHeadConfig,
        *,
        prompt_variant: str = "deformity_physics",
        num_frames: int | None = None,
        image_size: int | None = None,
        batch_size: int = 4,
        source: str = "<in memory>",
    ) -> None:
        self.model, self.tokenizer, self.head, self.head_config = model.eval(), tokenizer, head.eval(), head_config
        self.source = source
        self.num_frames = num_frames or head_config.num_frames
        self.image_size = image_size or head_config.image_size
        self.batch_size = max(1, int(batch_size))
        if prompt_variant not in head_config.prompts:
            raise ORMCheckpointError(
                f"rewards.orm.prompt_variant={prompt_variant!r} is not among the prompts of {source} "
                f"({', '.join(sorted(head_config.prompts))})"
            )
        self.prompt = head_config.prompts[prompt_variant]
        self._check_consistent()

    # ------------------------------------------------------------------ checks
    def _check_consistent(self) -> None:
        cfg, where = self.model.config, self.source
        text_layers = cfg.text_config.num_hidden_layers
        if self.head_config.hidden_size != cfg.text_config.hidden_size:
            raise ORMCheckpointError(
                f"{where}: {REWARD_CONFIG_FILE} hidden_size={self.head_config.hidden_size} but the InternVL language "
                f"model is {cfg.text_config.hidden_size} wide"
            )
        for layer in self.head_config.layers:
            if not -(text_layers + 1) <= layer <= text_layers:
                raise ORMCheckpointError(
                    f"{where}: {REWARD_CONFIG_FILE} layers has {layer}, outside the LLM's hidden states 0..{text_layers}"
                )
        vision_size = tuple(cfg.vision_config.image_size)
        if vision_size != (self.image_size, self.image_size):
            raise ORMCheckpointError(
                f"{where}: frames of {self.image_size}×{self.image_size} asked for (rewards.orm.image_size) but the "
                f"vision tower takes {vision_size[0]}×{vision_size[1]} (vision_config.image_size)"
            )
        self.tokens_per_tile = image_tokens_per_tile(cfg.vision_config, cfg.downsample_ratio)
        if cfg.image_seq_length != self.tokens_per_tile:
            raise ORMCheckpointError(
                f"{where}: config.json image_seq_length={cfg.image_seq_length} but the vision tower yields "
                f"{self.tokens_per_tile} tokens per tile"
            )
        tok = self.tokenizer
        self.img_start = getattr(tok, "start_image_token", None) or "<img>"
        self.img_end = getattr(tok, "end_image_token", None) or "</img>"
        self.img_context = getattr(tok, "context_image_token", None) or "<IMG_CONTEXT>"
        for token in (self.img_start, self.img_end, self.img_context):
            if tok.convert_tokens_to_ids(token) in (None, tok.unk_token_id):
                raise ORMCheckpointError(f"{where}: the tokenizer has no {token!r} token, which InternVL needs")
        if tok.convert_tokens_to_ids(self.img_context) != cfg.image_token_id:
            raise ORMCheckpointError(
                f"{where}: config.json image_token_id={cfg.image_token_id} is not the tokenizer's "
                f"{self.img_context!r} ({tok.convert_tokens_to_ids(self.img_context)})"
            )
        if not getattr(tok, "chat_template", None):
            raise ORMCheckpointError(f"{where}: the tokenizer has no chat template (chat_template.jinja)")

    # ------------------------------------------------------------------ inputs
    def prompt_text(self, caption: str) -> str:
        """The chat-formatted prompt for one video, image placeholders already expanded (one tile per frame)."""
        tile = self.img_start + self.img_context * self.tokens_per_tile + self.img_end
        frames = "".join(f"Frame{i + 1}: {tile}\n" for i in range(self.num_frames))
        messages = [
            {"role": "system", "content": self.prompt.system},
            {"role": "user", "content": self.prompt.user_text(caption) + frames},
        ]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def build_inputs(self, videos: Tensor, captions: list[str]) -> dict[str, Tensor]:
        """``input_ids``/``attention_mask`` (right-padded, so real tokens keep their positions) and ``pixel_values``."""
        check_videos(videos, captions)
        for i, caption in enumerate(captions):
            if any(t in caption for t in (self.img_start, self.img_end, self.img_context)):
                raise ValueError(f"captions[{i}] contains an InternVL image token; remove it: {caption!r}")
        ids = [self.tokenizer(self.prompt_text(c), add_special_tokens=False)["input_ids"] for c in captions]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        length = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention_mask[row, : len(seq)] = 1
        pixel_values = internvl_pixel_values(videos, self.num_frames, self.image_size)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}

    # ------------------------------------------------------------------ scoring
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score(self, videos: Tensor, captions: list[str]) -> Tensor:
        check_videos(videos, captions)
        out = [self._score_batch(videos[i : i + self.batch_size], list(captions[i : i + self.batch_size]))
               for i in range(0, videos.shape[0], self.batch_size)]
        return torch.cat(out)

    def _score_batch(self, videos: Tensor, captions: list[str]) -> Tensor:
        inputs = self.build_inputs(videos, captions)
        dtype, device = next(self.model.parameters()).dtype, self.device
        mask = inputs["attention_mask"].to(device)
        out = self.model.model(
            input_ids=inputs["input_ids"].to(device),
            attention_mask=mask,
            pixel_values=inputs["pixel_values"].to(device=device, dtype=dtype),
            output_hidden_states=True,
        )
        hidden = [h.to(next(self.head.parameters()).dtype) for h in out.hidden_states]
        return self.head(hidden, mask).float().cpu()

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | Path) -> Path:
        """Write the checkpoint folder (layout in the module docstring) into a temp folder, then rename it into place."""
        from safetensors.torch import save_file
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        def fill(tmp: Path) -> None:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            GotOcr2ImageProcessorPil(
                size={"height": self.image_size, "width": self.image_size}, crop_to_patches=False,
                image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
            ).save_pretrained(tmp)
            state = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
            save_file(state, str(tmp / REWARD_HEAD_FILE), metadata={"format": "pt"})
            (tmp / REWARD_CONFIG_FILE).write_text(self.head_config.model_dump_json(indent=2))

        return atomic_write_dir(Path(path), fill)

    @classmethod
    def from_run_config(cls, cfg: Any, device: torch.device | str = "cpu") -> "SoliRewardORM":
        """The ``registry.ORMS`` factory for ``rewards.orm.backend: solireward``: the checkpoint folder at
        ``rewards.orm.path``, bf16 on GPU when ``rewards.orm.dtype`` says so (bf16 matmuls crawl on CPU)."""
        orm = cfg.rewards.orm
        if not orm.path:
            raise ValueError("rewards.orm.path is empty: give the SoliReward checkpoint folder")
        device = torch.device(device)
        dtype = torch.bfloat16 if (orm.dtype == "bf16" and device.type == "cuda") else torch.float32
        return cls.from_pretrained(orm.path, device=device, dtype=dtype, prompt_variant=orm.prompt_variant,
                                   num_frames=orm.num_frames, image_size=orm.image_size)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        prompt_variant: str = "deformity_physics",
        num_frames: int | None = None,
        image_size: int | None = None,
        batch_size: int = 4,
    ) -> "SoliRewardORM":
        from transformers import AutoTokenizer, InternVLForConditionalGeneration

        root = Path(path)
        head_config = read_head_config(root)
        config = json.loads((root / "config.json").read_text())
        if config.get("model_type") != "internvl":
            raise ORMCheckpointError(
                f"{root / 'config.json'}: model_type={config.get('model_type')!r}, expected 'internvl' (transformers' "
                "native InternVL); remote-code InternVL chat checkpoints need converting first (docs/models.md)"
            )
        if not any((root / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
            raise ORMCheckpointError(f"{root}: no model.safetensors (or its index) for the InternVL weights")
        model = InternVLForConditionalGeneration.from_pretrained(str(root), dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(root))
        head = HPQAHead(head_config)
        load_head_state(head, root / REWARD_HEAD_FILE)
        head.to(device=device, dtype=dtype)
        return cls(model, tokenizer, head, head_config, prompt_variant=prompt_variant, num_frames=num_frames,
                   image_size=image_size, batch_size=batch_size, source=str(root))


def read_head_config(root: Path) -> RewardHeadConfig:
    """``reward_config.json`` of a checkpoint folder, with errors that name the folder, file or field."""
    if not root.is_dir():
        raise ORMCheckpointError(f"SoliReward checkpoint folder not found: {root}")
    cfg_path = root / REWARD_CONFIG_FILE
    if not cfg_path.is_file():
        hint = (" — it holds training_config.json, so it looks like an upstream SoliReward checkpoint, which needs "
                "converting first (docs/models.md)") if (root / "training_config.json").is_file() else ""
        raise ORMCheckpointError(f"{cfg_path} is missing{hint}")
    for name in ("config.json", REWARD_HEAD_FILE):
        if not (root / name).is_file():
            raise ORMCheckpointError(f"{root / name} is missing: a SoliReward checkpoint folder needs it")
    try:
        return RewardHeadConfig.model_validate_json(cfg_path.read_text())
    except ValidationError as err:
        fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in err.errors())
        raise ORMCheckpointError(f"{cfg_path}: {fields}") from None


def load_head_state(head: HPQAHead, path: Path) -> None:
    """Load ``reward_head.safetensors`` strictly: a missing, unexpected or mis-shaped key is named."""
    state = read_safetensors(path)
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        parts = ([f"missing keys {missing}"] if missing else []) + ([f"unexpected keys {extra}"] if extra else [])
        raise ORMCheckpointError(f"{path}: {'; '.join(parts)}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ORMCheckpointError(
                f"{path}: key {key!r} has shape {tuple(value.shape)}, the head expects {tuple(expected[key].shape)}"
            )
    head.load_state_dict(state)


__all__ = [
    "DEFAULT_PROMPTS",
    "HEAD_FORMAT",
    "REWARD_CONFIG_FILE",
    "REWARD_HEAD_FILE",
    "AttentionQuery",
    "HPQAHead",
    "ORMCheckpointError",
    "PromptTemplate",
    "RewardHeadConfig",
    "SoliRewardORM",
    "image_tokens_per_tile",
    "load_head_state",
    "read_head_config",
]
