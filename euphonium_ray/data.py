"""Prompts and precomputed prompt embeddings in upstream's layout (``videos2caption.json``).

The json is a list of ``{"prompt_embed_path", "prompt_attention_mask", "caption"}``; each embedding file holds a
(1+L, D) tensor whose row 0 carries the CLIP pooled vector in its first P dims, and each mask file an (L,) tensor.
Paths may be absolute or relative to the json's folder. Files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from euphonium_ray.models.base import TextConditioning
from euphonium_ray.errors import EuphoniumError

EMBED_KEY = "prompt_embed_path"
MASK_KEY = "prompt_attention_mask"
CAPTION_KEY = "caption"


class DataError(EuphoniumError, ValueError):
    """Bad prompt or embedding input; the message names the file (and the entry or shape) at fault."""


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line, stripped; blank lines skipped. A missing or empty file is an error naming it."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"prompts file not found: {file}")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"prompts file {file} is not UTF-8 text ({exc})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"prompts file {file} contains no prompts (it is empty or only blank lines)")
    return prompts


@dataclass
class PromptItem:
    """One stored prompt: the (1+L, D) embedding, the (L,) mask and the caption."""

    prompt_embed: Tensor
    attention_mask: Tensor
    caption: str
    index: int


def _load_tensor(path: Path, json_path: Path, what: str) -> Tensor:
    if not path.is_file():
        raise DataError(f"{json_path}: {what} file not found: {path}")
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or non-tensor file
        raise DataError(f"{path}: cannot read the {what} ({type(exc).__name__}: {exc})") from None
    if not isinstance(value, Tensor):
        raise DataError(f"{path}: expected a tensor, found {type(value).__name__}")
    return value


class PromptEmbeddingDataset(torch.utils.data.Dataset):
    """Reads ``videos2caption.json`` and the tensors it points to (upstream's PromptEmbeddingDataset layout)."""

    def __init__(self, json_path: str | Path, *, pooled_dim: int | None = None) -> None:
        self.json_path = Path(json_path)
        if not self.json_path.is_file():
            raise DataError(f"embedding index not found: {self.json_path}")
        try:
            entries = json.loads(self.json_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{self.json_path} is not valid JSON: {exc}") from None
        if not isinstance(entries, list) or not entries:
            raise DataError(f"{self.json_path} must be a non-empty JSON list of prompt entries")
        for i, entry in enumerate(entries):
            missing = [k for k in (EMBED_KEY, MASK_KEY, CAPTION_KEY) if not isinstance(entry, dict) or k not in entry]
            if missing:
                raise DataError(f"{self.json_path}: entry {i} lacks {', '.join(missing)}")
        self.entries: list[dict[str, Any]] = entries
        self.pooled_dim = pooled_dim

    def __len__(self) -> int:
        return len(self.entries)

    def _resolve(self, raw: str) -> Path:
        path = Path(raw)
        return path if path.is_absolute() else self.json_path.parent / path

    @property
    def captions(self) -> list[str]:
        return [e[CAPTION_KEY] for e in self.entries]

    def __getitem__(self, index: int) -> PromptItem:
        entry = self.entries[index]
        embed_path, mask_path = self._resolve(entry[EMBED_KEY]), self._resolve(entry[MASK_KEY])
        embed = _load_tensor(embed_path, self.json_path, "prompt embedding")
        mask = _load_tensor(mask_path, self.json_path, "attention mask")
        if embed.ndim != 2 or embed.shape[0] < 2:
            raise DataError(f"{embed_path}: prompt embedding must be (1+L, D), got shape {tuple(embed.shape)}")
        if mask.ndim != 1 or mask.shape[0] != embed.shape[0] - 1:
            raise DataError(
                f"{mask_path}: attention mask must be ({embed.shape[0] - 1},) to match {embed_path} "
                f"of shape {tuple(embed.shape)}, got shape {tuple(mask.shape)}"
            )
        if self.pooled_dim is not None and self.pooled_dim > embed.shape[1]:
            raise DataError(f"{embed_path}: width {embed.shape[1]} is smaller than the pooled size {self.pooled_dim}")
        return PromptItem(embed, mask, entry[CAPTION_KEY], index)

    def conditioning(self, indices: Sequence[int], pooled_dim: int | None = None) -> tuple[TextConditioning, list[str]]:
        """The batch of ``indices`` as a TextConditioning plus captions."""
        return collate([self[i] for i in indices], pooled_dim=pooled_dim or self.pooled_dim)


def collate(items: Iterable[PromptItem], pooled_dim: int | None) -> tuple[TextConditioning, list[str]]:
    """Stack items: ``prompt_embeds = rows 1:``, ``pooled = row 0[:P]``, masks as they are.

    ``pooled_dim`` P is the policy's ``pooled_projection_dim`` (768 for real HunyuanVideo).
    """
    items = list(items)
    if not items:
        raise DataError("cannot collate an empty batch")
    if pooled_dim is None:
        raise DataError("collate needs pooled_dim (the transformer's pooled_projection_dim)")
    shapes = {tuple(it.prompt_embed.shape) for it in items}
    if len(shapes) != 1:
        raise DataError(f"prompt embeddings of different shapes in one batch: {sorted(shapes)}")
    embeds = torch.stack([it.prompt_embed for it in items])
    masks = torch.stack([it.attention_mask for it in items])
    cond = TextConditioning(prompt_embeds=embeds[:, 1:], attention_mask=masks, pooled=embeds[:, 0, :pooled_dim])
    return cond, [it.caption for it in items]


def pooled_dim_of(model_dir: str | Path) -> int:
    """``pooled_projection_dim`` from ``model_dir/transformer/config.json`` (what ``collate`` slices row 0 to)."""
    cfg_path = Path(model_dir) / "transformer" / "config.json"
    if not cfg_path.is_file():
        raise DataError(f"transformer config not found: {cfg_path}")
    try:
        return int(json.loads(cfg_path.read_text())["pooled_projection_dim"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{cfg_path}: cannot read pooled_projection_dim ({exc})") from None


def heldout_split(num_prompts: int, heldout: int, seed: int) -> tuple[list[int], list[int]]:
    """(held-out, training) prompt indices: a seeded random ``heldout`` of ``num_prompts``, both sorted. The toy
    build, the demo's evaluation and the convergence benchmark all split with this one function."""
    if not 0 < heldout < num_prompts:
        raise DataError(f"cannot hold out {heldout} of {num_prompts} prompts and still train on some")
    order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:heldout]), sorted(order[heldout:])


def write_subset_index(index: str | Path, out: str | Path, prompt_indices: Sequence[int]) -> Path:
    """A ``videos2caption.json`` holding only ``prompt_indices`` of ``index`` (entry i of the new file is entry
    ``prompt_indices[i]`` of the old), its paths made absolute so the file works from anywhere."""
    from euphonium_ray.files import write_atomic

    index = Path(index)
    source = PromptEmbeddingDataset(index)
    entries = []
    for i in prompt_indices:
        entry = dict(source.entries[i])
        for key in (EMBED_KEY, MASK_KEY):
            raw = Path(entry[key])
            entry[key] = str(raw if raw.is_absolute() else (index.parent / raw).resolve())
        entries.append(entry)
    out = Path(out)
    write_atomic(out, json.dumps(entries, indent=2, ensure_ascii=False))
    return out
