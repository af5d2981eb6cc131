"""The HunyuanVideo policy: diffusers' ``HunyuanVideoTransformer3DModel`` behind the ``Policy`` contract.

It loads a diffusers-layout folder (``transformer/`` + ``vae/``), optionally a trained transformer over it (a
diffusers transformer folder, as our checkpoints and upstream's ``checkpoint-N`` folders are), and optionally wraps
the attention projections in LoRA (peft, through diffusers' ``add_adapter``). Velocities come back in fp32 whatever
the weights are; attention goes through diffusers' default processor, i.e. PyTorch SDPA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from euphonium_ray.checkpoint import CheckpointError, read_transformer_weights
from euphonium_ray.models.base import LatentCodec, TextConditioning
from euphonium_ray.models.codecs import load_codec
from euphonium_ray.models.hunyuan_fast import FastForward, LoraMerge, supports_fast_forward
from euphonium_ray.sde import TimestepArithmetic, network_timestep
from euphonium_ray.errors import EuphoniumError

EMBEDDED_GUIDANCE = 6018.0  # upstream feeds this constant to the guidance-distilled DiT (≈ 6.0 × 1000)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
LORA_ADAPTER_DIR = "lora"  # diffusers adapter folder (pytorch_lora_weights.safetensors) inside a saved transformer
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


class PolicyLoadError(EuphoniumError, ValueError):
    """A model folder or checkpoint that cannot be loaded; the message names the path or the keys."""


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _key_list(keys: set[str], limit: int = 20) -> str:
    shown = sorted(keys)[:limit]
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more


def check_keys(expected: set[str], got: set[str], where: str) -> None:
    """Raise with the missing and unexpected key names when two state-dict key sets differ."""
    missing, extra = expected - got, got - expected
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_key_list(missing)}")
        if extra:
            parts.append(f"unexpected keys ({len(extra)}): {_key_list(extra)}")
        raise PolicyLoadError(f"{where} does not match the model: " + "; ".join(parts))


class HunyuanVideoPolicy:
    """``v_θ(x_σ, σ, text)`` from a HunyuanVideo-class DiT, plus what training and weight sync need."""

    def __init__(
        self,
        transformer: nn.Module,
        codec: LatentCodec | None,
        *,
        embedded_guidance: float = EMBEDDED_GUIDANCE,
        autocast_dtype: torch.dtype | None = None,
        timestep_arithmetic: TimestepArithmetic = "fp64",
    ) -> None:
        self.transformer = transformer
        self.codec = codec
        self.embedded_guidance = float(embedded_guidance)
        self.autocast_dtype = autocast_dtype
        self.timestep_arithmetic = timestep_arithmetic  # "fp32": upstream's int(σ·1000) (sde.network_timestep)
        self.fast: FastForward | None = None  # configure_speed: the fast forward (models/hunyuan_fast.py)
        self.lora_merge: LoraMerge | None = None  # configure_speed(merge_lora=True): adapters folded into W

    def configure_speed(self, *, unpadded_attention: bool = False, compile: str = "none",
                        merge_lora: bool = False) -> None:
        """The fast path's options (``model.unpadded_attention``, ``model.compile``, ``model.merge_lora``; see
        ``models/hunyuan_fast.py``). ``merge_lora`` is for frozen rollout copies: the adapters are merged now and
        again after every ``load_sync_state_dict``. Call it once, before the first forward."""
        if compile not in ("none", "blocks"):
            raise ValueError(f"compile must be 'none' or 'blocks', got {compile!r}")
        if merge_lora and self.is_lora:
            if self.lora_merge is None:
                self.lora_merge = LoraMerge(self.transformer)
            self.lora_merge.merge()
        elif self.lora_merge is not None:
            self.lora_merge.unmerge()
            self.lora_merge = None
        wanted = unpadded_attention or compile == "blocks"
        self.fast = FastForward(self.transformer, unpadded_attention=unpadded_attention,
                                compile_blocks=compile == "blocks") if wanted else None

    @property
    def is_lora(self) -> bool:
        """Whether the transformer carries LoRA adapters (then only they train and travel in weight syncs)."""
        return bool(getattr(self.transformer, "peft_config", None))

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
        checkpoint: str | Path | None = None,
        trainable: Literal["full", "lora", "none"] = "full",
        lora_rank: int = 16,
        lora_alpha: float = 16.0,
        lora_seed: int = 0,
        lora_dtype: torch.dtype | str | None = None,
        embedded_guidance: float = EMBEDDED_GUIDANCE,
        gradient_checkpointing: bool = False,
        autocast_dtype: torch.dtype | str | None = None,
        codec_dtype: torch.dtype | str = torch.float32,
        with_codec: bool = True,
        attention_backend: str | None = None,
        timestep_arithmetic: TimestepArithmetic = "fp64",
    ) -> "HunyuanVideoPolicy":
        """Load ``path/transformer`` (and the codec from ``path/vae``), then ``checkpoint`` over it, then LoRA.

        ``dtype`` is the weight dtype (bf16 for rollout copies, fp32 for a learner's master weights); LoRA adapters
        are initialised from ``lora_seed`` (the run's seed), in ``lora_dtype`` (default: ``dtype``; a learner on a
        bf16 base keeps fp32 adapters);
        ``autocast_dtype`` (e.g. bf16 on GPU) runs the forward under autocast. ``trainable="none"`` freezes all.
        Attention is diffusers' default, PyTorch SDPA; ``attention_backend`` picks another diffusers backend
        (e.g. ``"flash"`` with flash-attn installed, or ``"_native_cudnn"``).
        """
        from diffusers import HunyuanVideoTransformer3DModel

        root = Path(path)
        if not root.is_dir():
            raise PolicyLoadError(f"model folder not found: {root}")
        tdir = root / "transformer"
        if not (tdir / "config.json").is_file():
            raise PolicyLoadError(f"model folder {root} has no transformer/ (expected {tdir / 'config.json'})")
        codec = None
        if with_codec:
            vdir = root / "vae"
            if not vdir.is_dir():
                raise PolicyLoadError(f"model folder {root} has no vae/ (expected {vdir})")
            codec = load_codec(vdir, dtype=resolve_dtype(codec_dtype), device=device)
        weight_dtype = resolve_dtype(dtype)
        transformer = HunyuanVideoTransformer3DModel.from_pretrained(tdir, torch_dtype=weight_dtype)
        if checkpoint is not None:
            load_transformer_checkpoint(transformer, checkpoint)
        if trainable == "lora":
            add_lora(transformer, rank=lora_rank, alpha=lora_alpha, seed=lora_seed)
            if lora_dtype is not None:
                for name, param in transformer.named_parameters():
                    if "lora_" in name:
                        param.data = param.data.to(resolve_dtype(lora_dtype))
        elif trainable == "full":
            transformer.requires_grad_(True)
        elif trainable == "none":
            transformer.requires_grad_(False)
        else:
            raise ValueError(f"trainable must be 'full', 'lora' or 'none', got {trainable!r}")
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if attention_backend is not None:
            transformer.set_attention_backend(attention_backend)
        transformer.to(device)
        return cls(
            transformer,
            codec,
            embedded_guidance=embedded_guidance,
            autocast_dtype=None if autocast_dtype is None else resolve_dtype(autocast_dtype),
            timestep_arithmetic=timestep_arithmetic,
        )

    transformer_class_name = "HunyuanVideoTransformer3DModel"  # the ``_class_name`` its transformer/config.json names

    @classmethod
    def expected_weights(cls, transformer_config: dict[str, Any], *, lora_rank: int | None = None,
                         lora_alpha: float = 16.0) -> dict[str, tuple[int, ...]]:
        """Tensor names and shapes a transformer weights file must hold for this config (with ``lora_rank``: those
        of the LoRA adapter file ``save_pretrained`` writes), from the model built on the meta device: nothing is
        allocated or read, so the check before a run costs milliseconds even at full size."""
        from diffusers import HunyuanVideoTransformer3DModel

        config = {k: v for k, v in transformer_config.items() if not k.startswith("_")}
        with torch.device("meta"):
            transformer = HunyuanVideoTransformer3DModel.from_config(config)
            if lora_rank is None:
                return {k: tuple(v.shape) for k, v in transformer.state_dict().items()}
            add_lora(transformer, rank=lora_rank, alpha=lora_alpha)
        return {_saved_adapter_name(n): tuple(p.shape) for n, p in transformer.named_parameters() if "lora_" in n}

    # ------------------------------------------------------------------------------------------ forward
    @property
    def config(self) -> Any:
        return self.transformer.config

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def pooled_dim(self) -> int:
        return int(self.config.pooled_projection_dim)

    def _check_inputs(self, latents: Tensor, cond: TextConditioning) -> None:
        cfg = self.config
        if latents.ndim != 5 or latents.shape[1] != cfg.in_channels:
            raise ValueError(f"latents must be (B, {cfg.in_channels}, T, h, w), got {tuple(latents.shape)}")
        if cond.prompt_embeds.shape[-1] != cfg.text_embed_dim:
            raise ValueError(
                f"prompt embeddings have width {cond.prompt_embeds.shape[-1]} but the transformer expects "
                f"text_embed_dim={cfg.text_embed_dim}"
            )
        if cond.pooled.shape[-1] != cfg.pooled_projection_dim:
            raise ValueError(
                f"pooled text vector has width {cond.pooled.shape[-1]} but the transformer expects "
                f"pooled_projection_dim={cfg.pooled_projection_dim}"
            )
        if len(cond) != latents.shape[0]:
            raise ValueError(f"batch of {latents.shape[0]} latents but {len(cond)} text conditionings")

    def forward_inputs(self, latents: Tensor, sigma: Tensor | float, cond: TextConditioning) -> dict[str, Tensor]:
        """The transformer's keyword arguments for ``velocity`` (batch-first tensors on the model's device)."""
        self._check_inputs(latents, cond)
        batch, device, dtype = latents.shape[0], self.device, self.dtype
        # a python float stays fp64 so that int(1000σ) truncates as upstream's python arithmetic does (0.7 → 700)
        sigma_t = sigma if isinstance(sigma, Tensor) else torch.tensor(float(sigma), dtype=torch.float64)
        if sigma_t.ndim == 0:
            sigma_t = sigma_t.expand(batch)
        inputs = {
            "hidden_states": latents.to(device, dtype),
            "timestep": network_timestep(sigma_t, self.timestep_arithmetic).to(device),
            "encoder_hidden_states": cond.prompt_embeds.to(device, dtype),
            "encoder_attention_mask": cond.attention_mask.to(device),
            "pooled_projections": cond.pooled.to(device, dtype),
        }
        if self.config.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), self.embedded_guidance, device=device, dtype=torch.float32)
        return inputs

    def autocast(self) -> Any:
        """The autocast context of a forward (``autocast_dtype`` on GPU, none on CPU)."""
        device = self.device
        enabled = self.autocast_dtype is not None and device.type == "cuda"
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled)

    def velocity(self, latents: Tensor, sigma: Tensor | float, cond: TextConditioning) -> Tensor:
        """fp32 velocity at per-sample σ (B,) (or one σ for all); timestep ``int(1000σ)``, guidance 6018."""
        inputs = self.forward_inputs(latents, sigma, cond)
        with self.autocast():
            if self.fast is not None and supports_fast_forward(self.transformer):
                out = self.fast(**inputs)
            else:
                out = self.transformer(**inputs, return_dict=False)[0]
        return out.float()

    # ----------------------------------------------------------------------------------------- training
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def sync_state_dict(self) -> dict[str, Tensor]:
        """Every transformer tensor, or only the LoRA tensors when training LoRA (what a broadcast carries)."""
        if self.is_lora:
            return {n: p.detach() for n, p in self.transformer.named_parameters() if "lora_" in n}
        return {n: t.detach() for n, t in self.transformer.state_dict().items()}

    def load_sync_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy a broadcast into the live tensors in place (dtype converted), after checking the key sets match."""
        targets = (
            dict(self.transformer.named_parameters()) if self.is_lora else self.transformer.state_dict()
        )
        if self.is_lora:
            targets = {n: p for n, p in targets.items() if "lora_" in n}
        check_keys(set(targets), set(state), "weight update")
        with torch.no_grad():
            for name, target in targets.items():
                src = state[name]
                if src.shape != target.shape:
                    raise PolicyLoadError(f"weight update: {name} has shape {tuple(src.shape)}, expected {tuple(target.shape)}")
                target.copy_(src.to(device=target.device, dtype=target.dtype))
        if self.lora_merge is not None:  # a merged rollout copy: fold the new adapters in (from the kept W0)
            self.lora_merge.merge()

    # ------------------------------------------------------------------------------------------- saving
    def merged_state_dict(self) -> dict[str, Tensor]:
        """The transformer's weights in the base model's key names, LoRA deltas folded in (W + scale·B·A)."""
        if not self.is_lora:
            return {n: t.detach().contiguous() for n, t in self.transformer.state_dict().items()}
        from peft.tuners.lora import LoraLayer

        merged: dict[str, Tensor] = {}
        for name, tensor in self.transformer.state_dict().items():
            if "lora_" in name:
                continue
            kept = self.lora_merge.base_weight(name) if self.lora_merge is not None else None
            merged[name.replace(".base_layer.", ".")] = (tensor if kept is None else kept).detach().clone()
        with torch.no_grad():
            for name, module in self.transformer.named_modules():
                if isinstance(module, LoraLayer):
                    for adapter in module.active_adapters:
                        delta = module.get_delta_weight(adapter)
                        key = f"{name}.weight"
                        merged[key] = (merged[key].float() + delta.float()).to(merged[key].dtype)
        return {k: v.contiguous() for k, v in merged.items()}

    def save_pretrained(self, path: str | Path, state: dict[str, Tensor] | None = None) -> None:
        """A diffusers transformer folder (config.json + diffusion_pytorch_model.safetensors) that
        ``HunyuanVideoTransformer3DModel.from_pretrained`` loads; LoRA runs also get ``lora/`` (the adapter alone,
        in diffusers' ``pytorch_lora_weights.safetensors`` format) and save the merged weights. ``state``: the
        full weights to write instead of the live ones (gathered from FSDP shards; full fine-tuning only)."""
        from safetensors.torch import save_file

        if state is not None and self.is_lora:
            raise ValueError("save_pretrained(state=...) writes full weights; a LoRA policy saves its adapter")
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        if state is None and not self.is_lora:
            self.transformer.save_pretrained(out, safe_serialization=True)
            return
        weights = self.merged_state_dict() if state is None else {k: v.contiguous() for k, v in state.items()}
        self.transformer.save_config(out)
        save_file(weights, str(out / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        if self.is_lora:
            self.transformer.save_lora_adapter(out / LORA_ADAPTER_DIR)

    def load_pretrained(self, path: str | Path) -> None:
        """Restore what ``save_pretrained`` wrote: the full weights, or for LoRA the adapter (not the merge, which
        would apply the adapter twice)."""
        folder = Path(path)
        if not self.is_lora:
            load_transformer_checkpoint(self.transformer, folder)
            return
        adapter_file = folder / LORA_ADAPTER_DIR / "pytorch_lora_weights.safetensors"
        saved = read_transformer_weights(adapter_file)
        state = {_peft_param_name(k): v for k, v in saved.items()}
        self.load_sync_state_dict(state)


def _peft_param_name(saved_key: str) -> str:
    """``x.to_q.lora_A.weight`` (saved adapter) → ``x.to_q.lora_A.default.weight`` (live parameter)."""
    head, _, leaf = saved_key.rpartition(".")
    return f"{head}.default.{leaf}"


def _saved_adapter_name(live_name: str) -> str:
    """The inverse of ``_peft_param_name``: ``x.to_q.lora_A.default.weight`` → ``x.to_q.lora_A.weight``."""
    head, _, leaf = live_name.rpartition(".")
    return f"{head.removesuffix('.default')}.{leaf}"


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions (``model.tf32``); both flags, since cuDNN's default is on."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def add_lora(transformer: nn.Module, *, rank: int, alpha: float, targets: tuple[str, ...] = LORA_TARGETS,
             seed: int = 0) -> None:
    """Freeze the transformer and wrap its attention projections in trainable LoRA adapters (B = 0 at start).

    peft draws the A matrices from torch's global generator; they are drawn here under ``seed`` (the global state
    is restored after), so two runs with one seed start from the same adapters and the rollout workers' adapters
    equal the learner's before any broadcast."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,
                                           target_modules=list(targets)))
    for name, param in transformer.named_parameters():
        param.requires_grad_("lora_" in name)


def load_transformer_checkpoint(transformer: nn.Module, checkpoint: str | Path) -> None:
    """Load a trained transformer over the base one; the key sets must match exactly (the error lists them)."""
    try:
        state = read_transformer_weights(checkpoint)
    except CheckpointError as exc:
        raise PolicyLoadError(str(exc)) from None
    expected = transformer.state_dict()
    check_keys(set(expected), set(state), f"checkpoint {checkpoint}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise PolicyLoadError(
                f"checkpoint {checkpoint}: {name} has shape {tuple(tensor.shape)}, the model has {tuple(expected[name].shape)}"
            )
    transformer.load_state_dict(state, strict=True)
