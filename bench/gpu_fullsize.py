"""One full Euphonium step at full size on one GPU, through Ray: every role of ``euphonium-ray train`` on a share of it.

Builds random-init model folders on local disk (``bench/fullsize_models.py``: HunyuanVideo transformer, 20 dual +
40 single blocks at width 3072, written once in bf16; the HunyuanVideo VAE; a latent PRM of the first 8 dual
blocks; an InternVL3-1B-shaped SoliReward-style ORM; random prompt embeddings), then runs one step of
``configs/hunyuan_kuberay.yaml`` with sizes and paths set for one machine: upstream's shape (latent 16x8x60x60 =
480x480, 29 frames; a group of 8; 16 SDE steps; RGG on steps 12-15 from the PRM pool), LoRA rank 64 on a bf16 base
(``model.lora_base_dtype``), the learner under Ray Train, the adapter broadcast through the object store.

Records per phase seconds, each role's peak CUDA memory (``torch.cuda.max_memory_allocated`` reported by the
actors, the learner with its step statistics) and loading seconds, and what writing the weights cost, into
``--out``: ``fullsize_1gpu.json``, ``fullsize_1gpu.md`` (short README) and the stage logs. When a role runs out of
memory, the report names it and the shortfall (from CUDA's own message) and the step is retried at a smaller
depth that the shortfall says fits (a view of the same weights: no rewrite), if the deadline leaves time.

    python3 bench/gpu_fullsize.py --out $OUT                                   # one H200
    sh scripts/loopback.sh .venv/bin/python bench/gpu_fullsize.py --tiny --device cpu --out /tmp/fullsize
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # five processes share one GPU

from bench.fullsize_report import diagnose_failure, markdown, phase_row, smaller_depth  # noqa: E402
from euphonium_ray.stage_log import StageLog  # noqa: E402

NAME = "fullsize_1gpu"
PRODUCTION = ROOT / "configs" / "hunyuan_kuberay.yaml"
ROLES = ("rollout", "prm", "orm", "learner")


# --------------------------------------------------------------------------------------------- preflight
def preflight(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """What the run needs from the machine, checked before anything is written: the classes the models are built
    from (transformers' InternVL needs transformers 5.x), room on the work folder's disk, a GPU."""
    import shutil

    found: dict[str, Any] = {}
    problems: list[str] = []
    for module, names in (("transformers", ("InternVLForConditionalGeneration", "InternVLConfig", "Qwen2Tokenizer")),
                          ("transformers.models.got_ocr2.image_processing_pil_got_ocr2", ("GotOcr2ImageProcessorPil",)),
                          ("diffusers", ("HunyuanVideoTransformer3DModel", "AutoencoderKLHunyuanVideo")),
                          ("peft", ("LoraConfig",))):
        try:
            mod = __import__(module, fromlist=list(names))
            missing = [n for n in names if not hasattr(mod, n)]
        except ImportError as exc:
            missing = [f"(module: {exc})"]
            mod = None
        top = module.split(".")[0]
        found[top] = getattr(sys.modules.get(top), "__version__", "?")
        if missing:
            problems.append(f"{module} lacks {', '.join(missing)} ({top} {found[top]}); the ORM and policy are built "
                            "with transformers 5.x and diffusers 0.42 classes: carry those wheels")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    need = 2 * 2**30 if args.tiny else 40 * 2**30  # transformer 24 + PRM 6 + ORM 2 + VAE 1 GiB, and room
    found["work_dir_free_gib"] = free / 2**30
    if free < need and not (work / "build.json").is_file():
        problems.append(f"{work} has {free / 2**30:.1f} GiB free; the model folders need about {need / 2**30:.0f} GiB")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append("--device cuda but torch sees no CUDA device")
    return found, problems


# ------------------------------------------------------------------------------------------------- build
def build(args: argparse.Namespace) -> int:
    """(In its own process, so the driver holds no CUDA memory.) Write every model folder once; a folder whose
    spec matches is kept. Writes ``work/build.json``."""
    import torch

    from bench.fullsize_models import build_orm, build_policy_folder, build_prm, write_embeddings

    work = Path(args.work_dir)
    log = StageLog(Path(args.out) / "build.log")
    device = torch.device(args.device)
    spec = {"tiny": args.tiny, "prm_blocks": args.prm_blocks, "orm": args.orm_size, "tokens": args.tokens,
            "device": args.device}
    done = work / "build.json"
    if done.is_file() and json.loads(done.read_text()).get("spec") == spec:
        log(f"model folders in {work} match {spec}: kept")
        return 0
    report: dict[str, Any] = {"spec": spec}
    with log.stage("policy (transformer + VAE)"):
        transformer, report["policy"] = build_policy_folder(work / "HunyuanVideo", device, tiny=args.tiny,
                                                            layers=None, single_layers=None)
        log(json.dumps({k: v for k, v in report["policy"].items() if k != "vae"}))
    with log.stage(f"latent PRM ({args.prm_blocks} dual blocks)"):
        report["prm"] = build_prm(work / "latent_prm", transformer, args.prm_blocks)
        log(json.dumps(report["prm"]))
    del transformer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with log.stage(f"ORM ({args.orm_size})"):
        report["orm"] = build_orm(work / "SoliReward", args.orm_size, device)
        log(json.dumps(report["orm"]))
    with log.stage("prompt embeddings"):
        text_dim = json.loads((work / "HunyuanVideo" / "transformer" / "config.json").read_text())["text_embed_dim"]
        write_embeddings(work / "embeddings", 2, args.tokens, text_dim)
    done.write_text(json.dumps(report, indent=2) + "\n")
    log.close()
    return 0


def depth_view(work: Path, layers: int, single_layers: int) -> Path:
    """A model folder whose transformer keeps the first ``layers`` dual and ``single_layers`` single blocks of
    the written one: a config of that depth beside links to the same weight files (diffusers skips the rest)."""
    full = work / "HunyuanVideo"
    config = json.loads((full / "transformer" / "config.json").read_text())
    if (layers, single_layers) == (config["num_layers"], config["num_single_layers"]):
        return full
    if layers > config["num_layers"] or single_layers > config["num_single_layers"]:
        raise SystemExit(f"error: depth {layers}/{single_layers} exceeds the written model's "
                         f"{config['num_layers']}/{config['num_single_layers']}")
    view = work / f"HunyuanVideo-{layers}x{single_layers}"
    (view / "transformer").mkdir(parents=True, exist_ok=True)
    config.update(num_layers=layers, num_single_layers=single_layers)
    (view / "transformer" / "config.json").write_text(json.dumps(config, indent=2))
    for f in (full / "transformer").iterdir():
        link = view / "transformer" / f.name
        if f.name != "config.json" and not link.exists():
            link.symlink_to(f)
    for name in ("vae", "model_index.json"):
        if not (view / name).exists():
            (view / name).symlink_to(full / name)
    return view


# -------------------------------------------------------------------------------------------------- run
def run_config(args: argparse.Namespace, model_dir: Path):
    """configs/hunyuan_kuberay.yaml for one machine: paths to the built folders, upstream's video shape, one group,
    LoRA on a bf16 base, every role once on ``--share`` of the GPU, no checkpoint or videos after the step."""
    from euphonium_ray.config import load_config
    from euphonium_ray.driver import resolve_paths

    work = Path(args.work_dir)
    cuda = args.device == "cuda"
    share = args.share if cuda else 0.0
    frames, size = (5, 32) if args.tiny else (args.frames, args.size)
    sets = [
        f"model.path={model_dir}", f"data.prompts={work / 'embeddings' / 'videos2caption.json'}",
        f"rewards.orm.path={work / 'SoliReward'}", f"rewards.prm.path={work / 'latent_prm'}",
        f"output.dir={work / 'run'}", "steps=1", f"data.num_frames={frames}", f"data.height={size}",
        f"data.width={size}", "data.prompts_per_step=1", f"sampler.group_size={args.group}",
        "model.trainable=lora", f"model.lora_rank={args.lora_rank}", f"model.lora_alpha={args.lora_rank}",
        "model.lora_base_dtype=bf16", "optim.samples_per_forward=1", f"rewards.prm.micro_batch={args.prm_micro_batch}",
        "cluster.address=null", "cluster.fsdp=false", "cluster.resources={}", f"cluster.num_cpus={args.num_cpus}",
        f"cluster.rollout_cpus={args.role_cpus}", f"cluster.learner_cpus={args.role_cpus}",
        "output.write_final=false", "output.save_every=100000", "output.sample_every=0", "output.eval_every=0",
    ]
    sets += [f"cluster.num_{r}_workers=1" for r in ("rollout", "prm", "orm")] + ["cluster.num_learners=1"]
    sets += [f"cluster.{r}_gpus={share}" for r in ROLES]
    if args.tiny:
        from bench.fullsize_models import ORM_SIZES

        o = ORM_SIZES[args.orm_size]
        sets += [f"rewards.orm.num_frames={o['num_frames']}", f"rewards.orm.image_size={o['image_size']}"]
    return resolve_paths(load_config(PRODUCTION, sets + list(args.set), use_env=False))


def gpu_processes() -> dict[int, float]:
    """MiB of GPU memory per process id, as the driver sees it (``nvidia-smi``; empty where there is none)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    rows = [line.split(",") for line in out.strip().splitlines() if "," in line]
    return {int(pid): float(mib) for pid, mib in rows}


def one_step(args: argparse.Namespace, cfg: Any, log: StageLog, got: dict[str, Any]) -> None:
    """``driver.train`` for one step on a fresh local Ray; fills ``got`` (as it learns it, so a failure keeps what
    came before) with what each role held and how long each phase took."""
    import ray

    from euphonium_ray.driver import train

    t0 = time.perf_counter()

    def on_event(name: str, step: int, system: Any, record: dict[str, Any] | None) -> None:
        if name == "step_start":
            got["startup_s"] = time.perf_counter() - t0
            got["learner_ready"] = dict(system.ready)
            got["pids"] = {int(m["pid"]): f"{role} {i}" for role, reports in system.role_memory().items()
                           for i, m in enumerate(reports)} | {int(system.ready["pid"]): "learner"}
            log(f"step {step} starts {got['startup_s']:.1f}s after train(): roles and learner loaded")
        if name == "step_end" and record is not None:
            got["scalars"] = dict(record["scalars"])
            got["memory"] = system.role_memory()
            got["orm_failures"] = sum(ray.get([a.failure_count.remote() for a in system.roles.orm]))
            got["nvidia_smi_mib"] = gpu_processes()
            log("phases: " + json.dumps(phase_row(got["scalars"])))

    init = {"address": "local", "num_cpus": args.num_cpus, "include_dashboard": False,
            "object_store_memory": args.object_store_mb * 2**20, "_node_ip_address": "127.0.0.1",
            "_temp_dir": args.ray_temp_dir}
    if args.device == "cuda":
        init["num_gpus"] = 1
    log(f"ray.init({init})")
    ray.init(**init)
    try:
        train(cfg, progress=False, evaluate=False, on_event=on_event)
    finally:
        ray.shutdown()
    got["train_s"] = time.perf_counter() - t0


def checkpointed_input_bytes(cfg: Any, model_dir: Path) -> float:
    """What the learner keeps per transformer block under gradient checkpointing: the block's input, bf16, for
    one sample's trained transitions at once (``optim.samples_per_forward: 1``), video and text tokens."""
    t = json.loads((model_dir / "transformer" / "config.json").read_text())
    frames = (cfg.data.num_frames - 1) // 4 + 1
    video = frames * (cfg.data.height // 8 // t["patch_size"]) * (cfg.data.width // 8 // t["patch_size"])
    transitions = math.ceil(cfg.optim.timestep_fraction * (cfg.sampler.num_steps - 1))
    return float(transitions * (video + 256) * t["num_attention_heads"] * t["attention_head_dim"] * 2)


# ------------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny models and video (a CPU check of the same code)")
    p.add_argument("--layers", type=int, default=None, help="dual-stream blocks to run (default: all written, 20)")
    p.add_argument("--single-layers", type=int, default=None, help="single-stream blocks to run (default: all, 40)")
    p.add_argument("--prm-blocks", type=int, default=8)
    p.add_argument("--orm-size", default=None, help="internvl3-1b (default) or tiny")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--frames", type=int, default=29, help="video frames (29 -> 8 latent frames)")
    p.add_argument("--size", type=int, default=480, help="video height = width (480 -> 60 latent rows)")
    p.add_argument("--tokens", type=int, default=256, help="text tokens per prompt")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--prm-micro-batch", type=int, default=2, help="samples per PRM gradient pass")
    p.add_argument("--share", type=float, default=0.25, help="GPU share of each role")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--role-cpus", type=float, default=None)
    p.add_argument("--object-store-mb", type=int, default=None, help="default: 2 GiB when /dev/shm has room")
    p.add_argument("--retry", action=argparse.BooleanOptionalAction, default=True,
                   help="after an out-of-memory failure, run again at the depth the shortfall says fits")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results" / "gpu_ray"))
    p.add_argument("--work-dir", default="/tmp/euphonium_fullsize", help="model folders and the run (local disk)")
    p.add_argument("--ray-temp-dir", default="/tmp/ray_fullsize")
    p.add_argument("--stall-s", type=float, default=240.0)
    p.add_argument("--deadline-s", type=float, default=580.0, help="stacks into the log and exit past this")
    p.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.orm_size = args.orm_size or ("tiny" if args.tiny else "internvl3-1b")
    if args.tiny:
        args.prm_blocks = min(args.prm_blocks, 1)
        args.tokens = min(args.tokens, 32)
    args.num_cpus = args.num_cpus or min(8, os.cpu_count() or 2)
    args.role_cpus = args.role_cpus or (2.0 if args.num_cpus >= 8 else 0.5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.build_only:
        return build(args)
    out, work = Path(args.out), Path(args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = StageLog(out / f"{NAME}.log")
    log.watch(args.stall_s, args.deadline_s)
    started = time.monotonic()
    log("bench/gpu_fullsize.py " + " ".join(sys.argv[1:] if argv is None else argv))
    result: dict[str, Any] = {"command": "python3 bench/gpu_fullsize.py " + " ".join(sys.argv[1:] if argv is None
                                                                                    else argv),
                              "attempts": []}

    def save() -> None:
        (out / f"{NAME}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")

    with log.stage("preflight"):
        found, problems = preflight(args)
        log(f"found {json.dumps(found)}")
        for problem in problems:
            log(f"error: {problem}")
        if problems:
            return 2
    if args.object_store_mb is None:
        from bench.gpu_ray import object_store_bytes

        args.object_store_mb = object_store_bytes() // 2**20
    with log.stage("build model folders (own process)"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--build-only", *(argv if argv is not None
                                                                                else sys.argv[1:])]
        code = subprocess.run(cmd, cwd=ROOT).returncode
        if code:
            log(f"build failed with exit status {code} (see build.log)")
            return code
    result["build"] = json.loads((work / "build.json").read_text())
    result["setup"] = _setup(args)
    save()
    built = result["build"]["policy"]
    depth = (args.layers or built["num_layers"], args.single_layers or built["num_single_layers"])
    while True:
        attempt: dict[str, Any] = {"layers": depth[0], "single_layers": depth[1]}
        attempt_started = time.monotonic()
        result["attempts"].append(attempt)
        cfg = run_config(args, depth_view(work, *depth))
        (out / "run_config.yaml").write_text(cfg.to_yaml())
        try:
            with log.stage(f"one Euphonium step at depth {depth[0]}+{depth[1]}"):
                one_step(args, cfg, log, attempt)
            attempt["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported (which role, by how much), then maybe retried
            attempt.update(ok=False, error=f"{type(exc).__name__}: {exc}"[-4000:], diagnosis=diagnose_failure(exc))
            log(f"failed: {json.dumps(attempt['diagnosis'])}")
        save()
        left = args.deadline_s - (time.monotonic() - started)
        if attempt["ok"] or not args.retry or attempt["diagnosis"].get("shortfall_bytes") is None:
            break
        nxt = smaller_depth(built, attempt["diagnosis"]["shortfall_bytes"], *depth,
                            activation_bytes_per_block=checkpointed_input_bytes(cfg, Path(cfg.model.path)))
        last_s = time.monotonic() - attempt_started
        attempt["attempt_s"] = last_s
        if nxt is None or left < 1.2 * last_s:
            log(f"no retry: next depth {nxt}, {left:.0f}s left of the deadline, the last attempt took {last_s:.0f}s")
            break
        log(f"retrying at depth {nxt[0]}+{nxt[1]} (the shortfall plus 20% margin)")
        depth = nxt
    with log.stage("write"):
        save()
        (out / f"{NAME}.md").write_text(markdown(result))
    log.close()
    return 0 if result["attempts"][-1]["ok"] else 1


def _setup(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import torch

    name = "CPU"
    if args.device == "cuda":
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
        name = smi or "GPU"
    return {"device": args.device, "device_name": name, "tiny": args.tiny, "group": args.group,
            "frames": 5 if args.tiny else args.frames, "size": 32 if args.tiny else args.size, "tokens": args.tokens,
            "lora_rank": args.lora_rank, "prm_blocks": args.prm_blocks, "prm_micro_batch": args.prm_micro_batch,
            "orm": args.orm_size, "share": args.share if args.device == "cuda" else 0.0, "torch": torch.__version__,
            "ray": ray.__version__, "cpus": os.cpu_count(), "ray_num_cpus": args.num_cpus}


if __name__ == "__main__":
    raise SystemExit(main())
