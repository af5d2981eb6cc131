"""What a step's trajectory costs to move through Ray: rollout worker -> driver -> learner, torch-pickled (the old
transport) vs ``wire`` numpy payloads, at a GPU-sized batch on the CPU (no model: only the hops).

The rollout actor returns the batch (``Trajectories.to_dict``, packed or not), the driver reads it, selects the
kept rows and the learner's shard (``step.learning_batch``, ``split_for_learners``: every group kept, one learner)
and ``ray.put``s the shard (torch) or the rollout's ObjectRef and the shard's rows (wire, as
``TrainingSystem.learn`` does), and a learner actor reads it. Prints the seconds of each hop, the mean of
``--repeats``. (The torch row already profits from the shared, not copied, selection of every row.)

    sh scripts/loopback.sh .venv/bin/python bench/transport.py --videos 128 --sde-steps 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from euphonium_ray.learning import Advantages  # noqa: E402
from euphonium_ray.models.base import TextConditioning  # noqa: E402
from euphonium_ray.step import learning_batch, split_for_learners  # noqa: E402
from euphonium_ray.trajectory import Trajectories  # noqa: E402
from euphonium_ray.wire import pack, unpack  # noqa: E402

LATENT = (48, 8, 6, 6)  # the toy world's latent (configs/toy.yaml)


def batch(b: int, n: int, group: int) -> Trajectories:
    g = torch.Generator().manual_seed(0)
    return Trajectories(
        latents=torch.randn(b, n + 1, *LATENT, generator=g), sigmas=torch.linspace(1, 0, n + 1),
        log_probs=torch.randn(b, n, generator=g), process_rewards=torch.randn(b, n, generator=g),
        process_evaluated=torch.ones(b, n, dtype=torch.bool), guidance_norms=torch.rand(b, n, generator=g),
        guided_steps=torch.arange(n), x0_hat_final=torch.randn(b, *LATENT, generator=g),
        group_ids=torch.arange(b) // group, prompt_indices=torch.arange(b) // group, sample_seeds=torch.arange(b),
        cond=TextConditioning(torch.randn(b, 16, 64, generator=g), torch.ones(b, 16, dtype=torch.long),
                              torch.randn(b, 32, generator=g)),
        captions=[f"caption {i // group}" for i in range(b)], group_size=group)


@ray.remote(num_cpus=0)
class Rollout:
    def __init__(self, b: int, n: int, group: int) -> None:
        self.traj = batch(b, n, group)

    def sample(self, wire: bool) -> Any:
        d = self.traj.to_dict()
        return {"traj": pack(d) if wire else d}  # as RolloutWorker.sample answers


@ray.remote(num_cpus=0)
class Learner:
    def take(self, refs: list[Any], wire: bool) -> float:
        t0 = time.perf_counter()
        got = ray.get(refs[0])
        if wire:
            got = unpack(got)
            parts = [Trajectories.from_dict(unpack(a["traj"])) for a in ray.get(got["sources"])]
            traj = Trajectories.cat(parts).select(got["rows"])
        else:
            traj = Trajectories.from_dict(got["traj"])
        assert traj.batch_size > 0
        return time.perf_counter() - t0


def one(rollout: Any, learner: Any, wire: bool) -> dict[str, float]:
    t0 = time.perf_counter()
    source = rollout.sample.remote(wire)
    got = ray.get(source)
    traj = Trajectories.cat([Trajectories.from_dict(unpack(got["traj"], writable=False) if wire else got["traj"])])
    t1 = time.perf_counter()
    b, n = traj.batch_size, traj.num_steps
    adv = Advantages(terms=[(1.0, torch.zeros(b, n))], kept_rows=torch.arange(b), skipped_groups={})
    shards, _ = split_for_learners(learning_batch(traj, adv), 1)
    shard = shards[0]
    ref = ray.put(pack({"sources": [source], "rows": shard.rows, "terms": shard.terms}) if wire else
                  {"traj": shard.traj.to_dict(), "terms": shard.terms})
    t2 = time.perf_counter()
    fetch = ray.get(learner.take.remote([ref], wire))
    t3 = time.perf_counter()
    return {"rollout_to_driver": t1 - t0, "driver_select_put": t2 - t1, "learner_fetch": fetch, "total": t3 - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=128)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--sde-steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    mb = args.videos * (args.sde_steps + 1) * 4 * int(torch.Size(LATENT).numel()) / 1e6
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=max(600, int(8 * mb)) * 1024**2,
             _node_ip_address="127.0.0.1")
    try:
        rollout, learner = Rollout.remote(args.videos, args.sde_steps, args.group), Learner.remote()
        print(f"{args.videos} videos x {args.sde_steps + 1} latents: {mb:.0f} MB of latent paths")
        for wire in (False, True):
            one(rollout, learner, wire)  # warm-up
            rows = [one(rollout, learner, wire) for _ in range(args.repeats)]
            mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
            print(f"{'wire (numpy)' if wire else 'torch pickle':<13} " + ", ".join(f"{k} {v:.3f}s" for k, v in
                                                                                  mean.items()))
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
