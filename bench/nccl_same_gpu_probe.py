"""Can a rollout worker and a learner that share one GPU (fractional GPUs) join one NCCL group for the weight
broadcast? Two processes, both on cuda:0, broadcast 1 GiB; prints what NCCL says. Run on a GPU machine:
    python bench/nccl_same_gpu_probe.py
"""

import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, world: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29655")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", 0))
    x = torch.full((2**28,), float(rank), device="cuda")  # 1 GiB of fp32
    try:
        for i in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            dist.broadcast(x, src=0)
            torch.cuda.synchronize()
            print(f"rank {rank}: broadcast {i} of 1 GiB in {time.perf_counter() - t:.3f} s, value {x[0].item()}",
                  flush=True)
    except Exception as exc:  # noqa: BLE001 - the probe reports whatever NCCL raises
        print(f"rank {rank}: {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(2,), nprocs=2)
