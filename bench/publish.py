"""How fast the learner's weights reach a colocated rollout worker (issue 15 item 5), with synthetic states.

Measures, with warm-up, ``torch.cuda.synchronize`` and the median of repetitions:

(a) the full HunyuanVideo transformer (13 B parameters; ``--tiny``: the test size) as fp32 masters, published as
    bf16 (cast on the device into a reused flat bucket, ``euphonium_ray.publish``) to a rollout copy on the same
    GPU: in one process (pack + device-to-device copy into the rollout's tensors) and between two processes (a
    learner process and a rollout process mapping the learner's bucket through a CUDA IPC handle);
(b) the same for the rank-64 LoRA adapters of the full transformer;
(c) for the record, the object-store path (pinned host bucket + ``ray.put``, ``ray.get`` + copy to the device)
    and today's path before this change (fp32 to pageable host memory + ``ray.put``), on a slice of the full state
    capped at ``--object-store-gib`` and scaled to the full size by bytes.

Shapes come from the model class on the meta device (nothing allocated); the tensors are random, built on the
device. Every measured transfer is checked bit for bit (the rollout's tensors against the learner's bucket, on the
device). Writes ``publish.json`` and ``publish.md`` into ``--out`` and prints the ratios to the targets.
``python3 bench/publish.py --device cpu --tiny --out /tmp/p`` is the CPU check the tests run (no IPC on CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from euphonium_ray.publish import BucketLayout, WeightBuckets, export_ipc, fingerprint, import_ipc, unpack  # noqa: E402

TARGETS = {"full": 0.1, "lora": 0.01}  # seconds, colocated publish (issue 15 item 5)


# ------------------------------------------------------------------------------------------------ shapes
def shapes(tiny: bool, lora_rank: int | None) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the HunyuanVideo transformer (or its LoRA adapters), from the meta device."""
    from euphonium_ray.models.hunyuan import HunyuanVideoPolicy
    from fullsize_models import TINY_TRANSFORMER

    config = dict(TINY_TRANSFORMER) if tiny else {}
    return HunyuanVideoPolicy.expected_weights(config, lora_rank=lora_rank)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _stats(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "reps": len(times)}


def _bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit identity on the device (integer views: -0.0 and NaN payloads count)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].reshape(-1).view(ints[a[k].element_size()]),
                                                 b[k].reshape(-1).view(ints[b[k].element_size()])) for k in a)


def _masters(spec: dict[str, tuple[int, ...]], device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return {k: torch.randn(s, generator=g, device=device) * 0.02 for k, s in spec.items()}


def _copy_into(dst: dict[str, torch.Tensor], src: dict[str, torch.Tensor]) -> None:
    names = list(dst)
    torch._foreach_copy_([dst[n] for n in names], [src[n] for n in names], non_blocking=True)


# ----------------------------------------------------------------------------------------- one process
def one_process(spec: dict[str, tuple[int, ...]], device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Pack (fp32 -> bf16 on the device into the reused bucket) and the rollout's device-to-device copy."""
    dtype = torch.bfloat16
    masters = _masters(spec, device, 0)
    bucket = WeightBuckets.for_state(masters, dtype, device)
    rollout = {k: torch.empty(s, dtype=dtype, device=device) for k, s in spec.items()}
    pack = _timed(lambda: bucket.pack(masters), device, args.reps, args.warmup)
    load = _timed(lambda: _copy_into(rollout, bucket.views), device, args.reps, args.warmup)

    def both() -> None:
        bucket.pack(masters)
        _copy_into(rollout, bucket.views)

    total = _timed(both, device, args.reps, args.warmup)
    check = _timed(lambda: fingerprint(rollout, bucket.layout, 1), device, max(args.reps // 2, 1), 1)
    same = _bit_equal(rollout, bucket.views) and fingerprint(rollout, bucket.layout, 1) == bucket.fingerprint(1)
    # the cast in the bucket is exactly Tensor.to's (one tensor at a time: no second copy of the state)
    cast_exact = all(_bit_equal({k: v.to(dtype)}, {k: bucket.views[k]}) for k, v in masters.items())
    n = bucket.layout.sizes.get("bfloat16", 0)
    half = n // 2
    flat = bucket.buffers["bfloat16"]
    copy = _timed(lambda: flat[:half].copy_(flat[half: 2 * half]), device, args.reps, args.warmup)
    bandwidth = 2 * half * 2 / statistics.median(copy)  # bytes read + written per second
    params = sum(t.numel() for t in masters.values())
    out = {"parameters": params, "tensors": len(spec), "published_bytes": bucket.nbytes(),
           "pack": _stats(pack), "rollout_copy": _stats(load), "publish_s": statistics.median(total),
           "publish": _stats(total), "check_s": statistics.median(check), "bit_identical": same,
           "cast_exact": cast_exact, "copy_bandwidth_gb_s": bandwidth / 1e9,
           # pack reads fp32 and writes bf16, the rollout copy reads and writes bf16: 10 bytes per parameter
           "device_copy_bound_s": params * 10 / bandwidth, "bf16_copy_bound_s": params * 4 / bandwidth}
    _sync(device)
    return out


# ---------------------------------------------------------------------------------------- two processes
def _rollout_process(conn: Any, spec: dict[str, tuple[int, ...]]) -> None:
    """The rollout side: map the learner's bucket once, then copy each announced version into its own tensors."""
    device = torch.device("cuda", torch.cuda.current_device())
    layout_rows, exported = conn.recv()
    layout = BucketLayout.from_json(layout_rows)
    views = unpack(import_ipc(exported), layout)
    rollout = {k: torch.empty(s, dtype=torch.bfloat16, device=device) for k, s in spec.items()}
    conn.send("ready")
    while (msg := conn.recv()) != "stop":
        t0 = time.perf_counter()
        _copy_into(rollout, views)
        torch.cuda.synchronize(device)
        conn.send(time.perf_counter() - t0)
    fp = fingerprint(rollout, layout, 1)
    conn.send((_bit_equal(rollout, views), fp))
    del msg


def _recv(conn: Any, timeout_s: float = 300.0) -> Any:
    """The other process's next message; an error (not a hang) when it died or stalls."""
    if not conn.poll(timeout_s):
        raise TimeoutError(f"no answer from the other process within {timeout_s:.0f}s")
    return conn.recv()


def two_processes(spec: dict[str, tuple[int, ...]], device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Learner process (this one) packs and announces; a rollout process maps the bucket through CUDA IPC and
    copies. Publish time: from the start of packing to the rollout's acknowledgement of its finished copy."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_rollout_process, args=(child, spec), daemon=True)
    proc.start()
    masters = _masters(spec, device, 1)
    bucket = WeightBuckets.for_state(masters, torch.bfloat16, device)
    bucket.pack(masters)
    bucket.synchronize()
    t0 = time.perf_counter()
    parent.send((bucket.layout.to_json(), export_ipc(bucket.buffers)))
    if _recv(parent) != "ready":
        raise RuntimeError("the rollout process did not map the bucket")
    setup = time.perf_counter() - t0
    copies: list[float] = []

    def publish() -> None:
        bucket.pack(masters)
        bucket.synchronize()  # the bytes are in place before the rollout hears of them
        parent.send("version")
        copies.append(float(_recv(parent)))

    times = _timed(publish, device, args.reps, args.warmup)
    parent.send("stop")
    same, fp = _recv(parent)
    proc.join(timeout=60)
    out = {"publish_s": statistics.median(times), "publish": _stats(times),
           "rollout_copy_s": statistics.median(copies[args.warmup:]), "ipc_setup_s": setup,
           "bit_identical": bool(same) and fp == bucket.fingerprint(1)}
    _sync(device)
    return out


# ----------------------------------------------------------------------------------------- object store
def object_store(spec: dict[str, tuple[int, ...]], device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """The object-store path (and today's before it) on a slice of at most ``--object-store-gib`` of bf16, in one
    process with a local Ray; times scaled to the whole state by bytes."""
    import ray

    cap = int(args.object_store_gib * 2**30)
    sliced: dict[str, tuple[int, ...]] = {}
    size = 0
    for k, s in spec.items():
        n = int(torch.Size(s).numel()) * 2
        if sliced and size + n > cap:
            break
        sliced[k], size = s, size + n
    full_bytes = sum(int(torch.Size(s).numel()) for s in spec.values()) * 2
    scale = full_bytes / size
    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=max(3 * int(args.object_store_gib * 2**30) + 2**28, 2**29),
                 include_dashboard=False, log_to_driver=False)
    masters = _masters(sliced, device, 2)
    dev = WeightBuckets.for_state(masters, torch.bfloat16, device)
    host = WeightBuckets(dev.layout, "cpu", pin=True)
    rollout = {k: torch.empty(s, dtype=torch.bfloat16, device=device) for k, s in sliced.items()}
    refs: list[Any] = []

    def publish() -> None:
        dev.pack(masters)
        host.copy_from(dev)
        dev.synchronize()
        refs.clear()
        refs.append(ray.put({d: b.view(torch.uint8).numpy() for d, b in host.buffers.items()}))

    def fetch() -> None:
        raw = ray.get(refs[0])
        views = unpack({d: torch.from_numpy(a).view(getattr(torch, d)) for d, a in raw.items()}, dev.layout)
        _copy_into(rollout, views)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pub = _timed(publish, device, max(args.reps // 2, 1), 1)
        get = _timed(fetch, device, max(args.reps // 2, 1), 1)
    same = _bit_equal(rollout, dev.views)

    def before() -> None:  # what ObjectStoreSync did before: fp32 to pageable host memory, then ray.put
        refs.clear()
        refs.append(ray.put({k: v.detach().to("cpu", copy=True) for k, v in masters.items()}))

    old = _timed(before, device, max(args.reps // 4, 1), 1)
    refs.clear()
    out = {"slice_bytes": size, "scale_to_full": scale, "publish": _stats(pub), "fetch": _stats(get),
           "publish_s_full": statistics.median(pub) * scale, "fetch_s_full": statistics.median(get) * scale,
           "before_publish_s_full": statistics.median(old) * scale, "bit_identical": same}
    return out


# ------------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    deadline = time.monotonic() + args.deadline_s
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "tiny": args.tiny, "reps": args.reps,
                              "warmup": args.warmup, "lora_rank": args.lora_rank, "targets_s": TARGETS}
    t0 = time.perf_counter()
    specs = {"full": shapes(args.tiny, None), "lora": shapes(args.tiny, args.lora_rank)}
    report["shapes_s"] = time.perf_counter() - t0
    parts: list[tuple[str, str, Callable[..., dict[str, Any]]]] = [
        ("full", "one_process", one_process), ("lora", "one_process", one_process),
        ("full", "two_processes", two_processes), ("lora", "two_processes", two_processes),
        ("lora", "object_store", object_store), ("full", "object_store", object_store)]
    for which, name, fn in parts:
        entry = report.setdefault(which, {})
        if time.monotonic() > deadline:
            entry[name] = {"skipped": "deadline"}
            continue
        if name == "two_processes" and device.type != "cuda":
            entry[name] = {"skipped": "CUDA IPC needs a GPU"}
            continue
        if name == "object_store" and args.no_ray:
            entry[name] = {"skipped": "--no-ray"}
            continue
        try:
            entry[name] = fn(specs[which], device, args)
        except Exception as exc:  # noqa: BLE001 - one part's failure is reported, the others still run
            entry[name] = {"error": f"{type(exc).__name__}: {exc}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "ray" in sys.modules:
        import ray

        ray.shutdown()
    for which in ("full", "lora"):
        parts_run = [v for v in report[which].values() if "bit_identical" in v]
        report[which]["bit_identical"] = bool(parts_run) and all(v["bit_identical"] for v in parts_run)
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Weight publish ({report['device']}, torch {report['torch']}{', tiny' if report['tiny'] else ''})",
             "", f"Median of {report['reps']} after {report['warmup']} warm-up; fp32 masters published as bf16.", "",
             "| state | path | publish s | target s | ratio to target | bit-identical |", "|---|---|---|---|---|---|"]
    for which in ("full", "lora"):
        for name, entry in report[which].items():
            if not isinstance(entry, dict):
                continue
            if "publish_s" in entry:
                s = entry["publish_s"]
            elif "publish_s_full" in entry:
                s = entry["publish_s_full"] + entry["fetch_s_full"]
            else:
                lines.append(f"| {which} | {name} | {entry.get('skipped') or entry.get('error')} | | | |")
                continue
            lines.append(f"| {which} | {name} | {s:.4f} | {TARGETS[which]} | {s / TARGETS[which]:.2f} | "
                         f"{entry.get('bit_identical')} |")
    full = report["full"].get("one_process", {})
    if "device_copy_bound_s" in full:
        lines += ["", f"Device copy bandwidth {full['copy_bandwidth_gb_s']:.0f} GB/s: pack + copy bound "
                      f"{full['device_copy_bound_s']:.4f} s (bf16 copy alone {full['bf16_copy_bound_s']:.4f} s); "
                      f"the rollout's cheap check {full['check_s']:.4f} s."]
    store = report["full"].get("object_store", {})
    if "before_publish_s_full" in store:
        lines += [f"Object store, scaled to the full state: publish {store['publish_s_full']:.2f} s + fetch "
                  f"{store['fetch_s_full']:.2f} s; before this change (fp32 to pageable memory + ray.put) the publish "
                  f"alone took {store['before_publish_s_full']:.2f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "publish")
    p.add_argument("--deadline-s", type=float, default=600.0, help="parts not started by then are skipped")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="the test-size transformer (a CPU check)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--object-store-gib", type=float, default=4.0, help="the object-store slice (scaled to full)")
    p.add_argument("--no-ray", action="store_true", help="skip the object-store part")
    args = p.parse_args(argv)
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "publish.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (args.out / "publish.md").write_text(text)
    print(text)
    for which in ("full", "lora"):
        for name in ("one_process", "two_processes"):
            entry = report[which].get(name, {})
            if "publish_s" in entry:
                print(f"ratio {which}/{name}: publish {entry['publish_s']:.4f} s = "
                      f"{entry['publish_s'] / TARGETS[which]:.2f} x target {TARGETS[which]} s")
    full = report["full"].get("one_process", {})
    if "device_copy_bound_s" in full:
        print(f"ratio full/one_process to the device-copy bound: {full['publish_s'] / full['device_copy_bound_s']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
