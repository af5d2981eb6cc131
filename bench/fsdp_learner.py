"""FSDP learner step at upstream's shape: the learner's code path (``euphonium_ray.sharding.shard_transformer`` +
``learning.grpo_update``) on a HunyuanVideo transformer at random init, fully sharded over every rank, fp32 master
weights, bf16 compute, activation checkpointing, full fine-tuning with AdamW. A rollout of the group through the
sharded model (no gradients) gives the step its trajectories; then GRPO steps with random advantages (this fixes
memory and time, not learning). Per rank: peak GPU memory and seconds, written as JSON.

With ``--prm-blocks N`` the step is Euphonium's, timed by phase on the learner's GPU (the colocated layout): a
latent PRM copied from the policy's embeddings and first N dual-stream blocks guides the rollout (RGG on the
upstream window) and gives the process rewards; the outcome reward is random (no full-size ORM exists here);
the GRPO update uses both; the publish phase gathers the full state that a weight broadcast sends.

    torchrun --nproc-per-node 2 bench/fsdp_learner.py --out OUT              # 2 GPUs, full depth (20 + 40 blocks)
    python bench/fsdp_learner.py --layers 10 --single-layers 20 --out OUT    # 1 GPU: half depth fits 139 GiB
    python bench/fsdp_learner.py --tiny --out /tmp/fsdp                      # anywhere (CPU, gloo)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from euphonium_ray.config import load_config  # noqa: E402
from euphonium_ray.learning import compute_advantages, grpo_update  # noqa: E402
from euphonium_ray.models.base import TextConditioning  # noqa: E402
from euphonium_ray.registry import POLICIES, PRMS  # noqa: E402
from euphonium_ray.sampling import sample_trajectories  # noqa: E402
from euphonium_ray.sharding import full_model_state, shard_transformer  # noqa: E402
from euphonium_ray.step import build_optimizer  # noqa: E402

TINY = dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_refiner_layers=1,
            patch_size=2, patch_size_t=1, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6))


def _gib(x: float) -> float:
    return round(x / 2**30, 2)


def _mem(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"allocated_gib": _gib(torch.cuda.memory_allocated()), "peak_gib": _gib(torch.cuda.max_memory_allocated()),
            "reserved_peak_gib": _gib(torch.cuda.max_memory_reserved())}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def init_distributed() -> tuple[int, int, torch.device]:
    """torchrun's environment, or a world of one."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29633")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    return rank, world, device


def run(args: argparse.Namespace) -> dict[str, Any]:
    from diffusers import HunyuanVideoTransformer3DModel

    rank, world, device = init_distributed()
    on_gpu = device.type == "cuda"
    compute = torch.bfloat16 if on_gpu else None
    frames, size, tokens = (5, 32, 32) if args.tiny else (args.frames, args.size, 256)
    latent_shape = (16, (frames - 1) // 4 + 1, size // 8, size // 8)
    g = args.group_size
    guided = args.prm_blocks > 0
    cfg = load_config(None, [f"sampler.group_size={g}", f"optim.grad_accum={args.grad_accum or g}", "optim.lr=1e-5",
                             "steps=1", f"rgg.enabled={str(guided).lower()}",
                             f"advantage.mode={'both' if guided else 'none'}", "rewards.latent_outcome=false",
                             "cluster.fsdp=true"], use_env=False)

    t0 = time.perf_counter()
    torch.manual_seed(0)  # every rank builds the same weights, then keeps its shard
    shape = dict(TINY if args.tiny else {}, num_layers=args.layers, num_single_layers=args.single_layers)
    with torch.device(device):
        transformer = HunyuanVideoTransformer3DModel(**shape)
    transformer.requires_grad_(True)
    if not args.no_checkpointing:
        transformer.enable_gradient_checkpointing()
    n_params = sum(p.numel() for p in transformer.parameters())
    prm = None
    if guided:  # copied before sharding: the PRM stays whole (it is not trained here), in the compute dtype
        prm = PRMS.component_class("latent").from_policy(transformer, num_dual_blocks=args.prm_blocks,
                                                         num_single_blocks=0)
        prm.requires_grad_(False)
        prm.to(compute or torch.float32)
    units = shard_transformer(transformer, compute_dtype=compute)
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    policy = POLICIES.get("hunyuanvideo")(transformer, codec=None, autocast_dtype=compute)
    local_params = sum(p.to_local().numel() for p in transformer.parameters())
    _sync(device)
    report: dict[str, Any] = {"build_seconds": time.perf_counter() - t0, "after_shard": _mem(device)}

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, tokens, policy.config.text_embed_dim, generator=gen)
    mask = torch.ones(1, tokens, dtype=torch.long)
    mask[:, tokens // 2:] = 0  # a padded caption
    cond = TextConditioning(prompt, mask, torch.randn(1, policy.config.pooled_projection_dim, generator=gen))
    cond = cond.to(device).repeat_interleave(g)

    prm_in_chunks = (functools.partial(prm.score_and_grad_in_chunks, micro_batch=args.prm_micro_batch)
                     if prm is not None else None)
    timings: dict[str, float] = {}
    _sync(device)
    t = time.perf_counter()
    traj = sample_trajectories(policy, cond, sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa,
                               prm=prm_in_chunks, latent_shape=latent_shape, group_size=g,
                               generator=torch.Generator().manual_seed(1 + rank), micro_batch=args.micro_batch,
                               timings=timings)
    _sync(device)
    report["rollout"] = {"seconds": time.perf_counter() - t, "rgg": guided,
                         "policy_seconds": timings.get("policy"), "prm_seconds": timings.get("prm"),
                         "guided_steps": int(traj.process_evaluated[0].sum()) if guided else 0, **_mem(device)}

    t = time.perf_counter()
    adv = compute_advantages(traj, torch.randn(g, generator=gen), None, cfg)
    report["advantages_seconds"] = time.perf_counter() - t
    optimizer = build_optimizer(policy.trainable_parameters(), cfg.optim)
    steps = []
    for i in range(args.steps):
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t = time.perf_counter()
        try:
            stats = grpo_update(policy, optimizer, traj, adv.terms, cfg,
                                generator=torch.Generator().manual_seed(2 + i))
        except torch.OutOfMemoryError as exc:  # keep what was measured; say what did not fit
            steps.append({"error": str(exc).splitlines()[0], **_mem(device)})
            break
        _sync(device)
        steps.append({"seconds": time.perf_counter() - t, **_mem(device), "transitions": stats["num_transitions"],
                      "updates": stats["num_updates"], "first_ratio_max": stats["first_ratio_max"],
                      "grad_norm": stats["grad_norm"]})
    report["grpo_steps"] = steps
    # what a weight broadcast or a checkpoint costs under FSDP: gathering the full fp32 state to rank 0's host
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    t = time.perf_counter()
    full = full_model_state(transformer)
    _sync(device)
    report["gather_full_state"] = {"seconds": time.perf_counter() - t,
                                   "gib": _gib(sum(v.numel() * v.element_size() for v in full.values()))}
    del full
    return {
        "rank": rank, "world_size": world,
        "device": torch.cuda.get_device_name(device) if on_gpu else platform.processor() or "cpu",
        "torch": torch.__version__, "tiny": args.tiny, "transformer_parameters": n_params,
        "local_parameters": local_params, "fsdp_units": units, "layers": [args.layers, args.single_layers],
        "compute_dtype": str(compute or torch.float32), "master_dtype": "torch.float32",
        "activation_checkpointing": not args.no_checkpointing, "group_size": g, "latent_shape": list(latent_shape),
        "text_tokens": tokens, "grad_accum": args.grad_accum or g, "prm_dual_blocks": args.prm_blocks,
        "prm_parameters": sum(p.numel() for p in prm.parameters()) if prm is not None else 0, **report,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/fsdp_learner")
    p.add_argument("--tiny", action="store_true", help="tiny transformer (CPU check of the same code)")
    p.add_argument("--layers", type=int, default=20, help="dual-stream blocks (HunyuanVideo: 20)")
    p.add_argument("--single-layers", type=int, default=40, help="single-stream blocks (HunyuanVideo: 40)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=None, help="samples per optimizer step (default: the group)")
    p.add_argument("--frames", type=int, default=29)
    p.add_argument("--size", type=int, default=480)
    p.add_argument("--steps", type=int, default=2, help="GRPO steps to time (the first allocates AdamW state)")
    p.add_argument("--micro-batch", type=int, default=None, help="rollout micro-batch")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--prm-blocks", type=int, default=0, help="PRM dual-stream blocks: >0 runs a Euphonium step (RGG)")
    p.add_argument("--prm-micro-batch", type=int, default=2, help="samples per PRM gradient pass")
    args = p.parse_args(argv)
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"fsdp_learner_rank{report['rank']}.json").write_text(json.dumps(report, indent=2))
    if report["rank"] == 0:
        print(json.dumps(report, indent=2))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
