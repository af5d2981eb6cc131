"""The latent process reward model (PRM): how good will this video be, judged from a noisy latent at σ.

Architecture (ours; upstream's Latent_PRM is not public, PRFL's PAVRM is the closest published recipe):

1. **Backbone**: the first K blocks of the policy transformer. A diffusers ``HunyuanVideoTransformer3DModel`` is
   built with ``num_layers``/``num_single_layers`` truncated and initialised from the base policy's embeddings
   and first blocks, so the PRM starts from features that already understand noisy latents at every timestep
   and the text.
2. **Pooling**: the video-token hidden states after the last kept block are captured by a forward pre-hook on
   the transformer's ``norm_out`` (so no diffusers internals are copied) and pooled by learned-query attention.
3. **Head**: an MLP on [pooled tokens, timestep/text embedding] → one scalar per sample (a logit when the
   model was trained on pass/fail labels; ``use_sigmoid`` maps it to [0, 1]).

Saved as ``config.json`` + ``model.safetensors`` in one folder. Inputs follow upstream's PRM call: the noisy
latent x_σ (B, C, T, h, w) at network timestep ``int(1000σ)`` (0 for a clean x̂0) and the same LLM states,
mask and CLIP pooled vector the policy sees.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from diffusers import HunyuanVideoTransformer3DModel
from torch import Tensor, nn

from euphonium_ray.models.base import TextConditioning
from euphonium_ray.sde import compute_dtype, network_timestep
from euphonium_ray.errors import EuphoniumError

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "LatentPRM", "PRMLoadError", "AttentionPool"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_CLASS_NAME = "LatentPRM"


class PRMLoadError(EuphoniumError, ValueError):
    """A PRM folder that cannot be loaded; the message names the folder, file or keys at fault."""


class AttentionPool(nn.Module):
    """Learned-query attention over the video tokens: (B, N, D) → (B, Q·D).

    A few learned queries let the model decide which tokens matter (the shape, its edges, the motion), unlike a
    mean that dilutes a small object in a mostly empty frame.
    """

    def __init__(self, dim: int, num_queries: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"pool width {dim} is not divisible by pool_heads={num_heads}")
        self.query = nn.Parameter(torch.randn(1, num_queries, dim) / math.sqrt(dim))
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, tokens: Tensor) -> Tensor:
        keys = self.norm(tokens)
        query = self.query.expand(tokens.shape[0], -1, -1).to(keys.dtype)
        pooled, _ = self.attn(query, keys, keys, need_weights=False)
        return pooled.flatten(1)


class LatentPRM(nn.Module):
    """Truncated policy transformer + attention pooling + MLP head; implements ``ProcessRewardModel``."""

    def __init__(
        self,
        backbone_config: dict[str, Any],
        num_queries: int = 1,
        pool_heads: int | None = None,
        head_hidden: int | None = None,
        embedded_guidance: float = 6018.0,
        use_sigmoid: bool = False,
        label: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        cfg = {k: v for k, v in backbone_config.items() if not k.startswith("_")}
        self.backbone = HunyuanVideoTransformer3DModel.from_config(cfg)
        width = self.backbone.config.num_attention_heads * self.backbone.config.attention_head_dim
        pool_heads = pool_heads or self.backbone.config.num_attention_heads
        head_hidden = head_hidden or width
        self.pool = AttentionPool(width, num_queries, pool_heads)
        self.head = nn.Sequential(
            nn.LayerNorm(num_queries * width + width),
            nn.Linear(num_queries * width + width, head_hidden),
            nn.SiLU(),
            nn.Linear(head_hidden, 1),
        )
        self.embedded_guidance = float(embedded_guidance)
        self.use_sigmoid = bool(use_sigmoid)
        # what the scalar means (e.g. {"kind": "score", "mean": ..., "std": ...}); informational, saved with it
        self.label: dict[str, Any] = dict(label or {})
        self._arch = {"num_queries": num_queries, "pool_heads": pool_heads, "head_hidden": head_hidden}
        self._captured: dict[str, Tensor] = {}
        self.backbone.norm_out.register_forward_pre_hook(self._capture_video_tokens)

    # ------------------------------------------------------------------------------------------- build
    @classmethod
    def from_policy(
        cls,
        policy_transformer: nn.Module,
        num_dual_blocks: int = 1,
        num_single_blocks: int = 0,
        num_queries: int = 1,
        pool_heads: int | None = None,
        head_hidden: int | None = None,
        embedded_guidance: float = 6018.0,
        use_sigmoid: bool = False,
    ) -> "LatentPRM":
        """A PRM whose backbone is the policy's embeddings and first blocks (copied, so training the PRM
        leaves the policy alone)."""
        pcfg = dict(policy_transformer.config)
        have_dual, have_single = int(pcfg["num_layers"]), int(pcfg["num_single_layers"])
        if not 0 <= num_dual_blocks <= have_dual:
            raise ValueError(f"num_dual_blocks={num_dual_blocks}: the policy has {have_dual} dual-stream blocks")
        if not 0 <= num_single_blocks <= have_single:
            raise ValueError(f"num_single_blocks={num_single_blocks}: the policy has {have_single} single-stream blocks")
        if num_dual_blocks + num_single_blocks == 0:
            raise ValueError("a PRM needs at least one transformer block (num_dual_blocks + num_single_blocks > 0)")
        pcfg.update(num_layers=num_dual_blocks, num_single_layers=num_single_blocks)
        prm = cls(pcfg, num_queries, pool_heads, head_hidden, embedded_guidance, use_sigmoid)
        source = policy_transformer.state_dict()
        wanted = prm.backbone.state_dict()
        missing = [k for k in wanted if k not in source]
        if missing:
            raise ValueError(f"the policy transformer lacks backbone weights {missing[:5]} (is it wrapped, e.g. LoRA?)")
        prm.backbone.load_state_dict({k: source[k].detach().clone() for k in wanted})
        param = next(policy_transformer.parameters())
        return prm.to(device=param.device, dtype=param.dtype)

    @property
    def config(self) -> dict[str, Any]:
        """What ``config.json`` holds: enough to rebuild the module before loading weights."""
        backbone = {k: v for k, v in dict(self.backbone.config).items() if not k.startswith("_")}
        backbone = json.loads(json.dumps(backbone))  # tuples → lists, so it round-trips through JSON
        return {
            "_class_name": _CLASS_NAME,
            "backbone": backbone,
            **self._arch,
            "embedded_guidance": self.embedded_guidance,
            "use_sigmoid": self.use_sigmoid,
            "label": self.label,
        }

    # ----------------------------------------------------------------------------------------- forward
    def _capture_video_tokens(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        # norm_out(hidden_states, temb): video tokens only (text tokens are split off by the blocks)
        self._captured["tokens"], self._captured["temb"] = args[0], args[1]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, latents: Tensor, sigma: Tensor | float, cond: TextConditioning) -> Tensor:
        """Raw head output (B,) in fp32 (fp64 for fp64 latents), differentiable w.r.t. ``latents`` and the parameters."""
        batch = latents.shape[0]
        if latents.ndim != 5:
            raise ValueError(f"latents must be (B, C, T, h, w), got shape {tuple(latents.shape)}")
        if len(cond) != batch:
            raise ValueError(f"text conditioning has {len(cond)} rows for {batch} latents")
        sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        if sig.numel() == 1:
            sig = sig.expand(batch)
        if sig.numel() != batch:
            raise ValueError(f"sigma has {sig.numel()} values for {batch} latents")
        timestep = network_timestep(sig).to(self.device)
        cond = cond.to(self.device, self.dtype)
        guidance = None
        if self.backbone.config.guidance_embeds:
            guidance = torch.full((batch,), self.embedded_guidance, device=self.device, dtype=self.dtype)
        self._captured.clear()
        self.backbone(
            hidden_states=latents.to(self.device, self.dtype),
            timestep=timestep,
            encoder_hidden_states=cond.prompt_embeds,
            encoder_attention_mask=cond.attention_mask,
            pooled_projections=cond.pooled,
            guidance=guidance,
            return_dict=False,
        )
        tokens, temb = self._captured.pop("tokens"), self._captured.pop("temb")
        features = torch.cat([self.pool(tokens), temb.to(tokens.dtype)], dim=1)
        out = self.head(features).squeeze(1)
        return out.to(compute_dtype(latents, out))

    def _output(self, raw: Tensor) -> Tensor:
        return torch.sigmoid(raw) if self.use_sigmoid else raw

    @torch.no_grad()
    def score(self, latents: Tensor, sigma: Tensor | float, cond: TextConditioning) -> Tensor:
        """Scores (B,) fp32 of noisy latents at σ (sigmoid applied when ``use_sigmoid``)."""
        return self._output(self(latents, sigma, cond))

    def score_and_grad(self, latents: Tensor, sigma: Tensor | float, cond: TextConditioning) -> tuple[Tensor, Tensor]:
        """Scores (B,) and d score / d latents (fp32, or fp64 for fp64 latents; the latents' shape): the RGG
        direction.

        The gradient is taken w.r.t. an fp32 copy of the latents (the cast to the weights' dtype is inside the
        graph), so bf16 weights still give an fp32 gradient; parameter gradients are neither computed nor kept.
        Samples do not interact in the network, so the gradient of the summed score is per-sample.
        """
        x = latents.detach().to(self.device, compute_dtype(latents)).requires_grad_(True)
        with torch.enable_grad():
            out = self._output(self(x, sigma, cond))
            (grad,) = torch.autograd.grad(out.sum(), x)
        return out.detach(), grad.to(latents.device)

    def score_and_grad_in_chunks(self, latents: Tensor, sigma: Tensor, cond: TextConditioning,
                                 micro_batch: int | None = None) -> tuple[Tensor, Tensor]:
        """``score_and_grad`` over ``micro_batch`` samples at a time, so that only one chunk's activations are
        held (a full-size PRM's gradient over a whole group does not fit in memory at once)."""
        step = micro_batch or latents.shape[0]
        parts = [self.score_and_grad(latents[i:i + step], sigma[i:i + step], cond.index(slice(i, i + step)))
                 for i in range(0, latents.shape[0], step)]
        return torch.cat([s for s, _ in parts]), torch.cat([g for _, g in parts])

    # ------------------------------------------------------------------------------------------- files
    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` + ``model.safetensors`` atomically (temp files renamed into place)."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp_weights = folder / f".{WEIGHTS_NAME}.tmp"
        tmp_config = folder / f".{CONFIG_NAME}.tmp"
        save_file(state, str(tmp_weights), metadata={"format": "pt", "class": _CLASS_NAME})
        tmp_config.write_text(json.dumps(self.config, indent=2) + "\n")
        tmp_weights.replace(folder / WEIGHTS_NAME)
        tmp_config.replace(folder / CONFIG_NAME)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        use_sigmoid: bool | None = None,
    ) -> "LatentPRM":
        """Load a folder written by :meth:`save_pretrained`; every failure names the file or keys at fault."""
        from safetensors import safe_open

        folder = Path(path)
        if not folder.is_dir():
            raise PRMLoadError(f"PRM folder not found: {folder}")
        cfg_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        for needed in (cfg_path, weights_path):
            if not needed.is_file():
                raise PRMLoadError(f"PRM folder {folder} has no {needed.name} (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
        cfg = _read_config(cfg_path)
        previous = torch.get_default_dtype()
        # built where it will run, in its dtype: the random init of a full-size backbone (billions of parameters)
        # in fp32 on the CPU costs as long as loading it; the weights below overwrite it either way
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                prm = cls._from_config(cfg, cfg_path, use_sigmoid)
        finally:
            torch.set_default_dtype(previous)
        try:
            with safe_open(str(weights_path), framework="pt", device="cpu") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupted headers
            raise PRMLoadError(f"{weights_path} is not a readable safetensors file: {exc}") from None
        _check_state(weights_path, prm.state_dict(), state)
        prm.load_state_dict(state)
        return prm.to(device=device, dtype=dtype).eval()

    @classmethod
    def _from_config(cls, cfg: dict[str, Any], cfg_path: Path, use_sigmoid: bool | None = None) -> "LatentPRM":
        try:
            return cls(
                cfg["backbone"],
                num_queries=int(cfg.get("num_queries", 1)),
                pool_heads=cfg.get("pool_heads"),
                head_hidden=cfg.get("head_hidden"),
                embedded_guidance=float(cfg.get("embedded_guidance", 6018.0)),
                use_sigmoid=bool(cfg.get("use_sigmoid", False)) if use_sigmoid is None else use_sigmoid,
                label=cfg.get("label"),
            )
        except (TypeError, ValueError) as exc:
            raise PRMLoadError(f"{cfg_path}: cannot build the PRM from this config: {exc}") from None

    @classmethod
    def expected_weights(cls, path: str | Path) -> dict[str, tuple[int, ...]]:
        """Tensor names and shapes the folder's ``model.safetensors`` must hold for its ``config.json``, from the
        PRM built on the meta device (nothing allocated or read). Raises PRMLoadError for an unusable config."""
        cfg_path = Path(path) / CONFIG_NAME
        with torch.device("meta"):
            prm = cls._from_config(_read_config(cfg_path), cfg_path)
        return {k: tuple(v.shape) for k, v in prm.state_dict().items()}

    @classmethod
    def from_run_config(cls, cfg: Any, device: torch.device | str = "cpu", **_: Any) -> "LatentPRM":
        """The ``registry.PRMS`` factory for ``rewards.prm.kind: latent``: ``rewards.prm.path`` in
        ``rewards.prm.dtype`` (bf16 only on GPU), frozen."""
        device = torch.device(device)
        p = cfg.rewards.prm
        dtype = torch.bfloat16 if (p.dtype == "bf16" and device.type == "cuda") else torch.float32
        prm = cls.from_pretrained(p.path, device=device, dtype=dtype, use_sigmoid=p.use_sigmoid)
        return prm.requires_grad_(False)


def _read_config(cfg_path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PRMLoadError(f"{cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("backbone"), dict):
        raise PRMLoadError(f"{cfg_path} is not a LatentPRM config (no 'backbone' mapping)")
    if cfg.get("_class_name", _CLASS_NAME) != _CLASS_NAME:
        raise PRMLoadError(f"{cfg_path} describes a {cfg['_class_name']!r}, not a {_CLASS_NAME}")
    return cfg


def _check_state(weights_path: Path, expected: dict[str, Tensor], found: dict[str, Tensor]) -> None:
    """Name missing, unexpected and wrongly shaped tensors instead of letting load_state_dict fail vaguely."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{k}: file {tuple(found[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and tuple(found[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {_few(mismatched)}")
    if problems:
        raise PRMLoadError(f"{weights_path} does not match its config.json: " + "; ".join(problems))


def _few(items: list[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{f', … {len(items) - n} more' if len(items) > n else ''}]"
