"""FSDP learner path on CPU (gloo, 2 ranks, no GPU): a sharded GRPO update equals the DDP update it replaces,
and the full weights/optimizer state gathered from the shards round-trip through a checkpoint."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from euphonium_ray.config import RunConfig
from euphonium_ray.learning import grpo_update

from test_learning import _cfg, _group_norm, _rollout
from test_sampling import tiny_policy

WORLD = 2


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _adam_moments(sd: dict) -> dict[str, torch.Tensor]:
    return {f"{pid}.{name}": v for pid, s in sd["state"].items() for name, v in s.items() if torch.is_tensor(v)}


def _ranks_update(rank: int, tmp: str) -> None:
    """Each rank: the same start weights, its own rollouts; DDP (all-reduced gradients) on one copy and FSDP on
    another, then rank 0 compares the gathered FSDP weights and AdamW moments with the DDP ones."""
    from euphonium_ray.checkpoint import load_checkpoint, read_optimizer_state, save_checkpoint
    from euphonium_ray.checkpoint import state_digest
    from euphonium_ray.sharding import average_gradients, full_model_state, full_optimizer_state, \
        full_state_on_device, load_full_optimizer_state, shard_transformer

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    cfg: RunConfig = _cfg(optim__lr=1e-3, optim__grad_accum=2, optim__clip_range=0.2, rgg__enabled=False)
    start = tiny_policy(seed=0)
    start.transformer.requires_grad_(True)
    start_state = {k: v.clone() for k, v in start.transformer.state_dict().items()}
    traj = _rollout(start, cfg, num_prompts=2, group=2, seed=100 * rank)
    rewards = torch.randn(traj.batch_size, generator=torch.Generator().manual_seed(rank))
    terms = [(1.0, _group_norm(rewards, 2)[:, None].expand(-1, traj.num_steps).clone())]

    ddp = copy.deepcopy(start)
    ddp_opt = torch.optim.AdamW(ddp.trainable_parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    ddp_stats = grpo_update(ddp, ddp_opt, traj, terms, cfg, torch.Generator().manual_seed(7 + rank),
                            grad_sync=average_gradients(WORLD))

    fsdp = copy.deepcopy(start)
    units = shard_transformer(fsdp.transformer)
    fsdp_opt = torch.optim.AdamW(fsdp.trainable_parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    fsdp_stats = grpo_update(fsdp, fsdp_opt, traj, terms, cfg, torch.Generator().manual_seed(7 + rank))
    weights = full_model_state(fsdp.transformer)
    moments = full_optimizer_state(fsdp.transformer, fsdp_opt)
    published = full_state_on_device(fsdp.transformer, dtype=torch.bfloat16)  # what a weight publication gathers
    as_is = full_state_on_device(fsdp.transformer)

    out: dict = {}
    assert rank == 0 or (published == {} and as_is == {})
    if rank == 0:
        ddp_weights = ddp.transformer.state_dict()
        out.update(units=units, updates=fsdp_stats["num_updates"] if "num_updates" in fsdp_stats else None,
                   moved=_max_diff(ddp_weights, start_state), weights=_max_diff(weights, ddp_weights),
                   moments=_max_diff(_adam_moments(moments), _adam_moments(ddp_opt.state_dict())),
                   grad_norm=[ddp_stats["grad_norm"], fsdp_stats["grad_norm"]],
                   local_numel=sum(p.to_local().numel() for p in fsdp.transformer.parameters()),
                   full_numel=sum(t.numel() for t in ddp_weights.values()),
                   published_is_the_cast_of_the_gathered=state_digest(published) == state_digest(
                       {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in weights.items()}),
                   gathered_on_device_is_exact=state_digest(as_is) == state_digest(weights))
        # a checkpoint written from the gathered state reloads into an unsharded policy and optimizer
        path = save_checkpoint(Path(tmp) / "run", 1, fsdp, fsdp_opt, {"seed": 0}, policy_state=weights,
                               optimizer_state=moments)
        plain = tiny_policy(seed=1)
        plain.transformer.requires_grad_(True)
        plain_opt = torch.optim.AdamW(plain.trainable_parameters(), lr=cfg.optim.lr)
        load_checkpoint(path, plain, plain_opt)
        out["reloaded_weights"] = _max_diff(plain.transformer.state_dict(), weights)
        out["reloaded_moments"] = _max_diff(_adam_moments(plain_opt.state_dict()), _adam_moments(moments))
        (Path(tmp) / "checkpoint.txt").write_text(str(path))
    dist.barrier()
    # resume: a freshly sharded optimizer takes the saved full state and gives back the same one
    path = Path((Path(tmp) / "checkpoint.txt").read_text())
    again = copy.deepcopy(start)
    shard_transformer(again.transformer)
    again_opt = torch.optim.AdamW(again.trainable_parameters(), lr=cfg.optim.lr)
    load_full_optimizer_state(again.transformer, again_opt, read_optimizer_state(path, again_opt))
    round_trip = full_optimizer_state(again.transformer, again_opt)
    if rank == 0:
        out["resumed_moments"] = _max_diff(_adam_moments(round_trip), _adam_moments(moments))
        (Path(tmp) / "result.json").write_text(json.dumps(out))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_update_over_two_gloo_ranks_equals_ddp_and_its_gathered_checkpoint_reloads(tmp_path):
    mp.spawn(_ranks_update, args=(str(tmp_path),), nprocs=WORLD)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["units"] >= 3  # each block list entry plus the root
    assert r["published_is_the_cast_of_the_gathered"] and r["gathered_on_device_is_exact"]
    assert r["local_numel"] * WORLD >= r["full_numel"] > r["local_numel"]  # each rank holds about half
    assert r["moved"] > 1e-4  # the update did something, so equality below is not vacuous
    assert r["weights"] < 1e-6 and r["moments"] < 1e-7, r
    assert abs(r["grad_norm"][0] - r["grad_norm"][1]) < 1e-5 * max(1.0, r["grad_norm"][0]), r
    assert r["reloaded_weights"] == 0.0 and r["reloaded_moments"] == 0.0, r
    assert r["resumed_moments"] == 0.0, r
