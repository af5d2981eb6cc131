"""The fast rollout path of the HunyuanVideo policy (issue 15): the same function as diffusers'
``HunyuanVideoTransformer3DModel.forward``, computed with less work. Each piece is a ``model.*`` option:

* ``unpadded_attention`` — when every row of a forward has the same number of prompt tokens L (a prefix mask, as
  upstream's preprocessing writes it; every member of a group shares its prompt), the text is cut to its L real
  tokens and the 60 blocks run attention with no mask. Exact: in diffusers' forward a padded text token is masked
  as a key for every query and the output keeps only the video tokens, so nothing a real token or the output sees
  depends on the padding (the token refiner still gets the cut, all-True mask, as diffusers gives it). Only the
  rounding differs: SDPA without a mask may pick another kernel (flash instead of memory-efficient attention).
* ``compile: blocks`` — regional ``torch.compile``: one compiled callable per dual- and single-stream block,
  made once and kept for the policy's life. The callables share the blocks' parameters, so weights copied in
  place (a weight sync, a LoRA merge) do not recompile; blocks of one class share one compiled graph.
* ``merge_lora`` (rollout copies) — the LoRA adapters folded into the base weights, ``W = W0 + s·B·A`` computed
  in fp32 from a kept copy of ``W0`` and rounded once to the weight dtype, after load and after every weight
  sync; peft then runs only the base layer. Exact up to that one rounding of W (no drift across versions: every
  merge starts from ``W0``).

Under FSDP (sharded parameters behind the root module's hooks) the policy keeps diffusers' own forward.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["FastForward", "LoraMerge", "is_fsdp_module", "shared_prompt_length", "supports_fast_forward"]


def shared_prompt_length(mask: Tensor) -> int | None:
    """L when every row of ``mask`` (B, T) is L ones followed by zeros (L ≥ 1, the same for all rows), else None.

    One small device-to-host copy: the decision is made on the host so that the network's shapes are static."""
    if mask.ndim != 2 or mask.shape[1] == 0:
        return None
    m = mask.detach().to("cpu", torch.bool)
    lengths = m.sum(dim=1)
    length = int(lengths[0])
    if length < 1 or not bool((lengths == length).all()):
        return None
    if not bool(m[:, :length].all()):  # the ones must come first (diffusers' own mask assumes it too)
        return None
    return length


def is_fsdp_module(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - older torch
        return False
    return isinstance(module, FSDPModule)


def supports_fast_forward(transformer: nn.Module) -> bool:
    """Whether :class:`FastForward` computes this transformer's forward: diffusers' HunyuanVideo layout without
    image conditioning, and not FSDP-sharded."""
    config = getattr(transformer, "config", None)
    needed = ("x_embedder", "context_embedder", "time_text_embed", "rope", "transformer_blocks",
              "single_transformer_blocks", "norm_out", "proj_out")
    return (config is not None and getattr(config, "image_condition_type", None) is None
            and all(hasattr(transformer, n) for n in needed) and not is_fsdp_module(transformer))


class FastForward:
    """diffusers' HunyuanVideo forward (no image conditioning) with the text cut to its shared prompt length and no
    attention mask where that is exact, and optionally compiled blocks. Returns the velocity (B, C, T, H, W)."""

    def __init__(self, transformer: nn.Module, *, unpadded_attention: bool = True, compile_blocks: bool = False,
                 compile_options: dict[str, Any] | None = None) -> None:
        self.transformer: Any = transformer  # diffusers' module: its submodules are read by name
        self.unpadded_attention = bool(unpadded_attention)
        self.compile_blocks = bool(compile_blocks)
        self.compile_options = dict(compile_options or {})
        self._blocks: list[Callable[..., Any]] | None = None
        self._single: list[Callable[..., Any]] | None = None
        self.calls = {"unmasked": 0, "masked": 0}

    # ---------------------------------------------------------------------------------------- blocks
    def _callables(self) -> tuple[list[Callable[..., Any]], list[Callable[..., Any]]]:
        """The blocks, or their compiled callables (made on first use and kept)."""
        t = self.transformer
        if not self.compile_blocks:
            return list(t.transformer_blocks), list(t.single_transformer_blocks)
        if self._blocks is None or self._single is None:
            self._blocks = [torch.compile(b, **self.compile_options) for b in t.transformer_blocks]
            self._single = [torch.compile(b, **self.compile_options) for b in t.single_transformer_blocks]
        return self._blocks, self._single

    # --------------------------------------------------------------------------------------- forward
    def __call__(self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                 encoder_attention_mask: Tensor, pooled_projections: Tensor, guidance: Tensor | None = None) -> Tensor:
        t = self.transformer
        length = shared_prompt_length(encoder_attention_mask) if self.unpadded_attention else None
        if length is not None:
            encoder_hidden_states = encoder_hidden_states[:, :length]
            encoder_attention_mask = encoder_attention_mask[:, :length]
        batch, _, frames, height, width = hidden_states.shape
        p, p_t = t.config.patch_size, t.config.patch_size_t

        rotary = t.rope(hidden_states)
        temb, token_replace_emb = t.time_text_embed(timestep, pooled_projections, guidance)
        hidden_states = t.x_embedder(hidden_states)
        encoder_hidden_states = t.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)

        attention_mask: Tensor | None = None
        if length is None:  # diffusers' mask: video tokens, then each row's first sum(mask) text tokens
            self.calls["masked"] += 1
            video, text = hidden_states.shape[1], encoder_hidden_states.shape[1]
            valid = video + encoder_attention_mask.sum(dim=1, dtype=torch.int)
            positions = torch.arange(video + text, device=hidden_states.device).unsqueeze(0)
            attention_mask = (positions < valid.unsqueeze(1)).unsqueeze(1).unsqueeze(1)
        else:
            self.calls["unmasked"] += 1

        first_frame_tokens = (height // p) * (width // p)
        dual, single = self._callables()
        checkpointing = torch.is_grad_enabled() and bool(getattr(t, "gradient_checkpointing", False))
        for block in [*dual, *single]:
            args = (hidden_states, encoder_hidden_states, temb, attention_mask, rotary, token_replace_emb,
                    first_frame_tokens)
            if checkpointing:
                hidden_states, encoder_hidden_states = t._gradient_checkpointing_func(block, *args)
            else:
                hidden_states, encoder_hidden_states = block(*args)

        hidden_states = t.proj_out(t.norm_out(hidden_states, temb))
        hidden_states = hidden_states.reshape(batch, frames // p_t, height // p, width // p, -1, p_t, p, p)
        hidden_states = hidden_states.permute(0, 4, 1, 5, 2, 6, 3, 7)
        return hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)


class LoraMerge:
    """LoRA adapters of a (frozen, rollout) transformer folded into its base weights, from a kept copy of them.

    ``merge()`` sets every adapted layer's weight to ``W0 + Σ s·B·A`` (fp32 sum, one rounding to the weight dtype)
    and marks the adapters merged, so peft's forward runs the base layer alone; call it again after the adapters
    change (a weight sync). ``unmerge()`` restores ``W0`` exactly. The copies of ``W0`` live beside the weights."""

    def __init__(self, transformer: nn.Module) -> None:
        from peft.tuners.lora import LoraLayer

        self.layers: list[tuple[str, Any]] = []
        for name, module in transformer.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            base = module.get_base_layer()
            if not isinstance(base, nn.Linear):
                raise ValueError(f"merge_lora: {name} adapts a {type(base).__name__}; only nn.Linear is merged")
            for adapter in module.active_adapters:
                if getattr(module, "use_dora", {}).get(adapter) or adapter in getattr(module, "lora_variant", {}):
                    raise ValueError(f"merge_lora: {name} uses a LoRA variant (DoRA, ...); only plain LoRA is merged")
                if module.lora_B[adapter].bias is not None:
                    raise ValueError(f"merge_lora: {name} has a LoRA bias; only plain LoRA is merged")
            self.layers.append((name, module))
        if not self.layers:
            raise ValueError("merge_lora: the transformer has no LoRA adapters")
        with torch.no_grad():
            self.base = {name: m.get_base_layer().weight.detach().clone() for name, m in self.layers}
        self.merged = False

    def delta(self, module: Any) -> Tensor:
        """Σ over active adapters of scaling·B·A, in fp32."""
        out: Tensor | None = None
        for adapter in module.active_adapters:
            a = module.lora_A[adapter].weight.float()
            b = module.lora_B[adapter].weight.float()
            d = (b @ a) * float(module.scaling[adapter])
            out = d if out is None else out + d
        assert out is not None
        return out

    @torch.no_grad()
    def merge(self) -> None:
        for name, module in self.layers:
            weight = module.get_base_layer().weight
            weight.copy_((self.base[name].float() + self.delta(module).to(weight.device)).to(weight.dtype))
            module.merged_adapters = list(module.active_adapters)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        for name, module in self.layers:
            module.get_base_layer().weight.copy_(self.base[name])
            module.merged_adapters = []
        self.merged = False

    def base_weight(self, name: str) -> Tensor | None:
        """The kept unmerged weight of ``name`` (a ``...base_layer.weight`` key), or None."""
        return self.base.get(name.removesuffix(".base_layer.weight"))
