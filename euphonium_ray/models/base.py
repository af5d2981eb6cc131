"""The contracts between models and the rest of the system.

The driver, actors and trainers see only these: a text conditioning batch in upstream's layout, a latent codec
(pixels <-> latents), a policy that predicts velocities, a latent process reward model and an outcome reward model.
A second model family plugs in by implementing them; nothing above this layer changes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@dataclass
class TextConditioning:
    """Precomputed prompt embeddings for a batch, as upstream's preprocessing writes them.

    ``prompt_embeds`` (B, L, D) are the LLM hidden states, ``attention_mask`` (B, L) marks real tokens and
    ``pooled`` (B, P) is the CLIP pooled vector (upstream stores it as row 0 of a (L+1, D) tensor, first P dims).
    ``captions`` (optional, B strings) ride along for components that read text rather than embeddings (the toy
    world's oracle process reward); they never travel in :meth:`as_dict`.
    """

    prompt_embeds: Tensor
    attention_mask: Tensor
    pooled: Tensor
    captions: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TextConditioning":
        return replace(
            self,
            prompt_embeds=self.prompt_embeds.to(device=device, dtype=dtype),
            attention_mask=self.attention_mask.to(device=device),
            pooled=self.pooled.to(device=device, dtype=dtype),
        )

    def with_captions(self, captions: list[str] | tuple[str, ...] | None) -> "TextConditioning":
        if captions is not None and len(captions) != len(self):
            raise ValueError(f"{len(captions)} captions for {len(self)} text conditionings")
        return replace(self, captions=None if captions is None else tuple(captions))

    def index(self, idx: Tensor | slice | list[int]) -> "TextConditioning":
        captions = None
        if self.captions is not None:
            rows = range(len(self))[idx] if isinstance(idx, slice) else (
                idx.reshape(-1).tolist() if isinstance(idx, Tensor) else list(idx))
            captions = tuple(self.captions[int(i)] for i in rows)
        return TextConditioning(self.prompt_embeds[idx], self.attention_mask[idx], self.pooled[idx], captions)

    def repeat_interleave(self, repeats: int) -> "TextConditioning":
        """Each prompt repeated for its G group members (contiguous groups)."""
        return TextConditioning(
            self.prompt_embeds.repeat_interleave(repeats, 0),
            self.attention_mask.repeat_interleave(repeats, 0),
            self.pooled.repeat_interleave(repeats, 0),
            None if self.captions is None else tuple(c for c in self.captions for _ in range(repeats)),
        )

    @staticmethod
    def cat(items: list["TextConditioning"]) -> "TextConditioning":
        have = all(c.captions is not None for c in items)
        return TextConditioning(
            torch.cat([c.prompt_embeds for c in items]),
            torch.cat([c.attention_mask for c in items]),
            torch.cat([c.pooled for c in items]),
            tuple(x for c in items for x in c.captions) if have else None,  # type: ignore[union-attr]
        )

    def as_dict(self) -> dict[str, Tensor]:
        return {"prompt_embeds": self.prompt_embeds, "attention_mask": self.attention_mask, "pooled": self.pooled}

    @staticmethod
    def from_dict(d: dict[str, Tensor]) -> "TextConditioning":
        return TextConditioning(d["prompt_embeds"], d["attention_mask"], d["pooled"])


@runtime_checkable
class LatentCodec(Protocol):
    """Pixels (B, 3, F, H, W) in [-1, 1] <-> latents (B, C, T, h, w) in the DiT's (scaled) latent space."""

    def encode(self, video: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]: ...


@runtime_checkable
class Policy(Protocol):
    """A flow-matching video model: v(x_σ, σ, text) ≈ ε − x0."""

    transformer: nn.Module
    codec: LatentCodec

    def velocity(self, latents: Tensor, sigma: Tensor, cond: TextConditioning) -> Tensor:
        """fp32 velocity for latents (B, C, T, h, w) at per-sample σ (B,)."""
        ...

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def sync_state_dict(self) -> dict[str, Tensor]:
        """What a weight broadcast carries: every parameter, or only the adapters when training LoRA."""
        ...

    def load_sync_state_dict(self, state: dict[str, Tensor]) -> None: ...

    def save_pretrained(self, path: str) -> None:
        """Write the transformer in the diffusers folder layout (config.json + safetensors)."""
        ...


@runtime_checkable
class ProcessRewardModel(Protocol):
    """A latent PRM: scores a noisy latent at σ with the text, differentiable w.r.t. the latent."""

    def score(self, latents: Tensor, sigma: Tensor, cond: TextConditioning) -> Tensor: ...

    def score_and_grad(self, latents: Tensor, sigma: Tensor, cond: TextConditioning) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class OutcomeRewardModel(Protocol):
    """A pixel ORM: scores decoded videos (B, 3, F, H, W) in [-1, 1] against their captions."""

    def score(self, videos: Tensor, captions: list[str]) -> Tensor: ...
