"""GPU smoke at upstream's RL shape: full-size HunyuanVideo transformer (random init, bf16), one RGG rollout of a
group of 8 at 480×480×29 frames (latent 16×8×60×60) with a PRM of our architecture, and one GRPO learner step.

It fixes shapes and dtypes on real hardware and records what they cost; it is not the throughput benchmark.
The same code runs at a tiny size on CPU (``--tiny``) so that it cannot rot between GPU sessions.

    python bench/gpu_smoke.py --out bench/results/gpu_smoke            # on an H100/H200
    python bench/gpu_smoke.py --tiny --out /tmp/smoke                  # anywhere
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from euphonium_ray.config import RunConfig, load_config  # noqa: E402
from euphonium_ray.learning import compute_advantages, grpo_update  # noqa: E402
from euphonium_ray.models.base import TextConditioning  # noqa: E402
from euphonium_ray.models.hunyuan import add_lora  # noqa: E402
from euphonium_ray.registry import POLICIES, PRMS  # noqa: E402
from euphonium_ray.sampling import sample_trajectories  # noqa: E402
from euphonium_ray.step import build_optimizer  # noqa: E402

TINY = dict(
    in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2,
    num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
    pooled_projection_dim=16, rope_axes_dim=(4, 6, 6),
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0


def build_policy(
    tiny: bool, device: torch.device, dtype: torch.dtype, lora_rank: int, prm_blocks: int
) -> tuple[Any, Any]:
    """(policy, PRM): the registered ``hunyuanvideo`` policy class around a random full-size transformer, and a
    ``latent`` PRM of its first ``prm_blocks`` dual-stream blocks."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in bf16: 12.8 B parameters do not fit twice
    try:
        with torch.device(device):
            transformer = HunyuanVideoTransformer3DModel(**(TINY if tiny else {}))
    finally:
        torch.set_default_dtype(previous)
    transformer.requires_grad_(False)
    # before LoRA wraps it
    prm = PRMS.component_class("latent").from_policy(transformer, num_dual_blocks=prm_blocks, num_single_blocks=0)
    prm.requires_grad_(False)
    add_lora(transformer, rank=lora_rank, alpha=float(lora_rank))
    transformer.enable_gradient_checkpointing()
    autocast = torch.bfloat16 if device.type == "cuda" else None
    return POLICIES.get("hunyuanvideo")(transformer, codec=None, autocast_dtype=autocast), prm


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = args.group_size
    frames, size = (5, 32) if args.tiny else (29, 480)
    latent_shape = (16, (frames - 1) // 4 + 1, size // 8, size // 8)
    cfg: RunConfig = load_config(None, [
        f"sampler.group_size={g}", "optim.grad_accum=1", "optim.lr=1e-5", "steps=1",
        "advantage.mode=both", "rewards.latent_outcome=false",
    ], use_env=False)

    t0 = time.perf_counter()
    policy, prm = build_policy(args.tiny, device, dtype, args.lora_rank, args.prm_blocks)
    _sync(device)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in policy.transformer.parameters())
    n_train = sum(p.numel() for p in policy.trainable_parameters())
    weights_gib = _peak_gib(device)

    text_dim = policy.config.text_embed_dim
    pooled_dim = policy.config.pooled_projection_dim
    tokens = 32 if args.tiny else 256
    gen = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randn(1, tokens, text_dim, generator=gen)
    mask = torch.ones(1, tokens, dtype=torch.long)
    mask[:, tokens // 2:] = 0  # padded prompt, like a real short caption
    cond = TextConditioning(prompt, mask, torch.randn(1, pooled_dim, generator=gen)).to(device, dtype)
    cond = cond.repeat_interleave(g)

    prm_in_chunks = functools.partial(prm.score_and_grad_in_chunks, micro_batch=args.prm_micro_batch)

    results: dict[str, Any] = {}
    for label, rgg_on in (("no_rgg", False), ("rgg", True)):
        cfg_run = cfg.model_copy(deep=True)
        cfg_run.rgg.enabled = rgg_on
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timings: dict[str, float] = {}
        _sync(device)
        t = time.perf_counter()
        traj = sample_trajectories(
            policy, cond, sampler=cfg_run.sampler, rgg=cfg_run.rgg, spsa=cfg_run.spsa,
            prm=prm_in_chunks if rgg_on else None, latent_shape=latent_shape, group_size=g,
            generator=torch.Generator(device="cpu").manual_seed(1), micro_batch=args.micro_batch, timings=timings,
        )
        _sync(device)
        wall = time.perf_counter() - t
        n = cfg_run.sampler.num_steps
        guided = sum(1 for i in range(n) if traj.process_evaluated[0, i])
        results[label] = {
            "rollout_seconds": wall,
            "policy_seconds_per_step": timings.get("policy", wall) / n,
            "prm_seconds_per_guided_step": (timings.get("prm", 0.0) / guided) if guided else 0.0,
            "guided_steps": guided,
            "peak_gib": _peak_gib(device),
        }

    # one GRPO learner step on the RGG rollout (random ORM rewards: the smoke fixes shapes, not learning)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    orm = torch.randn(g, generator=gen)
    adv = compute_advantages(traj, orm, None, cfg)
    optimizer = build_optimizer(policy.trainable_parameters(), cfg.optim)
    policy.transformer.train()
    _sync(device)
    t = time.perf_counter()
    try:
        stats = grpo_update(policy, optimizer, traj, adv.terms, cfg, generator=torch.Generator().manual_seed(2))
        _sync(device)
        results["learner"] = {
            "seconds": time.perf_counter() - t,
            "peak_gib": _peak_gib(device),
            "transitions": stats.get("num_transitions"),
            "loss": stats.get("loss"),
            "ratio_mean": stats.get("ratio_mean"),
            "first_ratio_max": stats.get("first_ratio_max"),
        }
    except torch.OutOfMemoryError as exc:  # report what did not fit rather than lose the rollout numbers
        results["learner"] = {"error": f"out of memory: {exc}".splitlines()[0], "peak_gib": _peak_gib(device)}
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "tiny": args.tiny,
        "group_size": g,
        "latent_shape": list(latent_shape),
        "text_tokens": tokens,
        "transformer_parameters": n_params,
        "trainable_parameters_lora": n_train,
        "lora_rank": args.lora_rank,
        "prm_dual_blocks": args.prm_blocks,
        "prm_parameters": sum(p.numel() for p in prm.parameters()),
        "weights_gib": weights_gib,
        "build_seconds": build_s,
        "micro_batch": args.micro_batch,
        **results,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/gpu_smoke")
    p.add_argument("--tiny", action="store_true", help="tiny transformer config (CPU check of the same code)")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prm-blocks", type=int, default=8, help="dual-stream blocks in the PRM backbone")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=None, help="split the group through the network")
    p.add_argument("--prm-micro-batch", type=int, default=2, help="samples per PRM gradient pass")
    args = p.parse_args(argv)
    if args.tiny:
        args.prm_blocks = min(args.prm_blocks, 1)
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_smoke.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
