"""A staged Ray smoke test for a new machine: start Ray, run tasks and actors, move an array through the object
store, (with a GPU) run a one-worker TorchTrainer, shut down. Every stage is logged with a timestamp to
``OUT/ray_smoke.log`` as it happens and every wait has a timeout, so a hang names its stage instead of losing the log.

    python3 scripts/ray_smoke.py --out $OUT            # CPU: 2 CPUs, two tasks, two actors, 100 MB through the store
    python3 scripts/ray_smoke.py --out $OUT --gpu      # + num_gpus=1, every task/actor on a quarter of the GPU,
                                                       #   a 1-worker TorchTrainer (NCCL) on a quarter as well

On a timeout it logs what Ray holds (resources free vs total: an actor waiting for a GPU share nobody has shows
here) and the tails of Ray's own logs (raylet, GCS, node agent, runtime-env agent, workers), then copies those logs
into ``OUT/ray_session_logs.tar.gz``. A watchdog dumps every thread's stack into the log when nothing happened for
``--wait-s`` + 30 s, and again and exits (status 1) if the whole run outlives ``--deadline-s``. The last line of the log is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from euphonium_ray.stage_log import StageLog  # noqa: E402  (standard library only)

# Ray reads these when it starts its processes: set before importing it. Token auth is pointless on loopback
# (and Ray 2.60 turns it on for a new local cluster when the variable is unset); usage stats would try the network.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def shm_free_bytes() -> int:
    try:
        st = os.statvfs("/dev/shm")
        return st.f_bavail * st.f_frsize
    except OSError:
        return 0


def object_store_bytes(requested_mb: int | None, object_mb: int) -> int:
    """The requested size, else half of /dev/shm's free space up to 2 GiB, but at least room for four arrays and
    512 MiB. Ray puts the store in /dev/shm only when it fits there (else in the temp dir, slowly); the log says
    which."""
    if requested_mb:
        return requested_mb * 1024**2
    floor = max(512 * 1024**2, 4 * object_mb * 1024**2 + 200 * 1024**2)
    return int(max(floor, min(2 * 1024**3, shm_free_bytes() // 2)))


def torch_cuda() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch not importable"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__}, no CUDA device"
    return True, f"torch {torch.__version__}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"


def log_resources(log: StageLog) -> None:
    """Ray's free vs total resources (an actor waiting for a GPU share that nobody has left shows here)."""
    import ray

    if not ray.is_initialized():
        return
    try:
        log(f"diagnose: resources free {ray.available_resources()} of {ray.cluster_resources()}")
    except Exception as exc:  # noqa: BLE001 - diagnostics must not hide the original failure
        log(f"diagnose: resources unreadable ({exc})")


def diagnose(log: StageLog, out: Path) -> None:
    """What Ray holds now, and the tails of its logs; then its logs as a tarball in ``out``."""
    log_resources(log)
    logs = session_log_dir()
    if logs is None:
        log("diagnose: no Ray session log folder")
        return
    wanted = ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err", "dashboard_agent.log",
              "runtime_env_agent.log", "monitor.log")
    files = [logs / n for n in wanted if (logs / n).exists()]
    files += sorted(logs.glob("worker-*.err"), key=lambda p: p.stat().st_mtime)[-4:]
    for f in files:
        tail = f.read_text(errors="replace").splitlines()[-15:]
        log(f"diagnose: tail of {f.name}:\n      " + "\n      ".join(tail))
    save_session_logs(out, logs)
    log(f"diagnose: Ray's logs copied to {out / 'ray_session_logs.tar.gz'}")


def session_log_dir() -> Path | None:
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return None
    path = Path(node.get_session_dir_path()) / "logs"
    return path if path.is_dir() else None


def save_session_logs(out: Path, logs: Path, max_bytes: int = 256 * 1024) -> None:
    """The text logs of the session, each cut to its last ``max_bytes`` (one file comes back, not hundreds)."""
    with tarfile.open(out / "ray_session_logs.tar.gz", "w:gz") as tar:
        for f in sorted(logs.rglob("*")):
            if f.is_file() and f.suffix in (".log", ".out", ".err", ".txt"):
                data = f.read_bytes()[-max_bytes:]
                info = tarfile.TarInfo(str(f.relative_to(logs)))
                info.size = len(data)

                tar.addfile(info, io.BytesIO(data))


def wait(log: StageLog, out: Path, refs: Any, timeout_s: float, what: str) -> Any:
    import ray

    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        log(f"{what}: no answer within {timeout_s:.0f}s")
        diagnose(log, out)
        raise


# -------------------------------------------------------------------------------------------- the stages
def run(args: argparse.Namespace, log: StageLog) -> dict[str, Any]:
    out = Path(args.out)
    result: dict[str, Any] = {"gpu": args.gpu}
    with log.stage("environment"):
        cuda, torch_info = torch_cuda()
        log(f"python {sys.version.split()[0]} ({sys.executable}); {os.cpu_count()} CPUs; /dev/shm free "
            f"{shm_free_bytes() / 1024**3:.2f} GiB; host {socket.gethostname()}; {torch_info}")
        log("env: " + " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                               if k.startswith(("RAY_", "CUDA_", "NCCL_")) or k == "PYTHONPATH"))
        if args.gpu and not cuda:
            raise RuntimeError(f"--gpu but {torch_info}")
    t = time.monotonic()
    import ray

    log(f"imported ray {ray.__version__} from {Path(ray.__file__).parent} in {time.monotonic() - t:.2f}s")
    result["ray"] = ray.__version__
    share = 0.25 if args.gpu else 0.0

    with log.stage("ray.init"):
        store = object_store_bytes(args.object_store_mb, args.object_mb)
        kwargs: dict[str, Any] = dict(num_cpus=args.num_cpus, include_dashboard=False, object_store_memory=store,
                                      _temp_dir=args.temp_dir, _node_ip_address=args.node_ip)
        if args.gpu:
            kwargs["num_gpus"] = 1
        log(f"ray.init({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})")
        info = ray.init(**kwargs)
        node = ray._private.worker._global_node
        shm = shm_free_bytes()  # Ray's own rule: /dev/shm when the whole store fits there, else the temp dir
        where = "/dev/shm" if shm >= store else f"{args.temp_dir} (slow: /dev/shm has {shm / 1024**2:.0f} MiB free)"
        log(f"node ip {info.address_info.get('node_ip_address')}, session {node.get_session_dir_path()}, object "
            f"store {store / 1024**2:.0f} MiB in {where}")
        log(f"cluster resources {ray.cluster_resources()}")
        result["resources"] = ray.cluster_resources()

    with log.stage("tasks"):
        @ray.remote(num_cpus=1, num_gpus=share)
        def probe(i: int) -> dict[str, Any]:
            got: dict[str, Any] = {"i": i, "pid": os.getpid(), "gpu_ids": ray.get_gpu_ids(),
                                   "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
            if share:
                import torch

                x = torch.randn(1024, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(i))
                got["matmul_sum"] = float((x @ x).sum())
                got["device"] = torch.cuda.get_device_name()
            return got

        got = wait(log, out, [probe.remote(i) for i in range(2)], args.wait_s, "two tasks")
        for g in got:
            log(f"task {g}")
        result["tasks"] = got

    with log.stage("actors and the object store"):
        @ray.remote(num_cpus=0.5, num_gpus=share)
        class Holder:
            def make(self, mb: int, seed: int):
                import numpy as np

                a = np.random.default_rng(seed).integers(0, 255, size=mb * 1024**2, dtype=np.uint8)
                if share:  # through the GPU and back, as a rollout's latents would come
                    import torch

                    a = torch.from_numpy(a).cuda().cpu().numpy()
                return a

            def ping(self) -> str:
                if share:
                    import torch

                    return torch.cuda.get_device_name()
                return "cpu"

            def checksum(self, a) -> tuple[int, int, str]:
                import numpy as np

                device = "cpu"
                if share:
                    import torch

                    a = torch.from_numpy(np.asarray(a).copy()).cuda().cpu().numpy()
                    device = torch.cuda.get_device_name()
                return int(np.asarray(a, dtype=np.uint64).sum()), int(np.asarray(a).nbytes), device

        a, b = Holder.remote(), Holder.remote()
        ready = wait(log, out, [a.ping.remote(), b.ping.remote()], args.wait_s, "two actors start")
        log(f"both actors answer (devices {ready})")
        t = time.monotonic()
        ref = a.make.remote(args.object_mb, 7)
        here = wait(log, out, a.checksum.remote(ref), args.wait_s, "the producer's own checksum")
        there = wait(log, out, b.checksum.remote(ref), args.wait_s, "the array read by the other actor")
        dt = time.monotonic() - t
        if here != there:
            raise RuntimeError(f"the array changed on its way between actors: {here} vs {there}")
        log(f"{args.object_mb} MB made by one actor, read by the other, checksums equal ({here[0]}); {dt:.2f}s")
        t = time.monotonic()
        back = wait(log, out, ray.put(b"\x01" * (args.object_mb * 1024**2)), args.wait_s, "driver put/get")
        log(f"driver ray.put + ray.get of {len(back) / 1024**2:.0f} MB in {time.monotonic() - t:.2f}s")
        result["object_mb"], result["object_seconds"] = args.object_mb, dt
        for actor in (a, b):
            ray.kill(actor)

    if args.gpu or args.trainer:
        with log.stage("TorchTrainer (1 worker)"):
            result["trainer"] = run_trainer(args, log, share)

    with log.stage("ray.shutdown"):
        done = threading.Event()
        threading.Thread(target=lambda: (ray.shutdown(), done.set()), daemon=True).start()
        if not done.wait(args.wait_s):
            raise TimeoutError(f"ray.shutdown did not return within {args.wait_s:.0f}s")
    result["stages"] = log.stages
    return result


def run_trainer(args: argparse.Namespace, log: StageLog, share: float) -> dict[str, Any]:
    """Ray Train's TorchTrainer as the learner uses it: one worker, NCCL on a GPU share (gloo on CPU)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    def loop(config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch as rtt
        import torch
        import torch.distributed as dist

        device = rtt.get_device()
        t = torch.full((4,), float(ray.train.get_context().get_world_rank() + 1), device=device)
        dist.all_reduce(t)
        got = {"sum": float(t.sum()), "device": str(device), "backend": dist.get_backend()}
        Path(config["result_path"]).write_text(json.dumps(got))  # Ray Train 2 keeps metrics only with checkpoints
        ray.train.report(got)

    use_gpu = share > 0
    result_path = Path(args.temp_dir) / "trainer_result.json"
    result_path.unlink(missing_ok=True)
    trainer = TorchTrainer(
        loop,
        train_loop_config={"result_path": str(result_path)},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1, **({"GPU": share} if use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name="ray_smoke", storage_path=str(Path(args.temp_dir) / "train")),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - reported by the waiting thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    thread.join(args.trainer_wait_s)
    if thread.is_alive():
        log(f"TorchTrainer.fit: no result within {args.trainer_wait_s:.0f}s")
        diagnose(log, Path(args.out))
        raise TimeoutError("TorchTrainer.fit hung")
    if "error" in outcome:
        raise outcome["error"]
    if not result_path.is_file():
        raise RuntimeError("TorchTrainer.fit returned but its worker wrote no result")
    got = json.loads(result_path.read_text())
    log(f"TorchTrainer worker: all_reduce over {got['backend']} on {got['device']} gave {got['sum']} (expected 4.0)")
    if got["sum"] != 4.0:
        raise RuntimeError(f"one-worker all_reduce of four ones gave {got['sum']}")
    return got


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "outputs/ray_smoke", help="log folder (default $OUT)")
    p.add_argument("--gpu", action="store_true", help="num_gpus=1; tasks, actors and a TorchTrainer on GPU shares")
    p.add_argument("--trainer", action="store_true", help="run the one-worker TorchTrainer on CPU too (needs torch)")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--object-mb", type=int, default=100, help="size of the array passed between the actors")
    p.add_argument("--object-store-mb", type=int, default=None, help="default: half of /dev/shm free, 0.5-2 GiB")
    p.add_argument("--temp-dir", default="/tmp/ray_smoke", help="Ray's temp dir (keep it short: socket paths)")
    p.add_argument("--node-ip", default="127.0.0.1", help="one machine: loopback, whatever the interfaces are")
    p.add_argument("--wait-s", type=float, default=60.0, help="timeout of every ray.get")
    p.add_argument("--trainer-wait-s", type=float, default=180.0)
    p.add_argument("--deadline-s", type=float, default=420.0, help="past this, every stack is dumped to the log and the run exits")
    args = p.parse_args(argv)
    out = Path(args.out)
    log = StageLog(out / "ray_smoke.log")
    log.watch(stall_s=args.wait_s + 30, deadline_s=args.deadline_s, on_stall=lambda: log_resources(log))
    log(f"ray_smoke {' '.join(sys.argv[1:])}")
    status = 0
    try:
        result = run(args, log)
        result["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - logged, summarised, exit status 1
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "stages": log.stages}
        status = 1
        try:
            import ray

            if ray.is_initialized():
                logs = session_log_dir()
                if logs is not None and not (out / "ray_session_logs.tar.gz").exists():
                    save_session_logs(out, logs)
                ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
    if args.temp_dir.startswith("/tmp/") and status == 0:
        shutil.rmtree(Path(args.temp_dir) / "train", ignore_errors=True)
    log("RESULT " + json.dumps(result, default=str))
    log.close()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
