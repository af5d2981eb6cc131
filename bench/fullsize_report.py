"""What ``bench/gpu_fullsize.py`` says about its run: the phases, each role's memory, which role ran out of memory
and by how much, the depth that would fit, and the short README."""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["diagnose_failure", "markdown", "phase_row", "smaller_depth"]

PHASES = ("rollout", "reward", "advantage", "learn", "broadcast", "step")
ROLLOUT_PARTS = ("weights", "policy", "prm", "sample")  # inside the rollout worker's ``sample`` call
GIB = 2**30
_UNITS = {"bytes": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_SIZE = r"([\d.]+) (bytes|B|KiB|MiB|GiB|TiB)"  # torch's format_size
# the marks each role leaves in an error's text, most specific first (a PRM failure surfaces inside the rollout's)
_ROLE_MARKS = (("prm", ("PRMScorer", "PRM actor")), ("orm", ("ORMScorer", "ORM actor")),
               ("learner", ("Ray Train", "RayTrainWorker", "learner failed", "learner_loop")),
               ("rollout", ("RolloutWorker", "rollout actor")))


def _bytes(number: str, unit: str) -> float:
    return float(number) * _UNITS[unit]


def _error_text(exc: BaseException) -> str:
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def diagnose_failure(exc: BaseException | str) -> dict[str, Any]:
    """Which role failed and, for CUDA running out of memory, by how much: the allocation it asked for minus what
    the GPU had free (CUDA's own message), and what every process on the GPU held at that moment."""
    text = exc if isinstance(exc, str) else _error_text(exc)
    role = next((r for r, marks in _ROLE_MARKS if any(m in text for m in marks)), "unknown")
    out: dict[str, Any] = {"role": role, "out_of_memory": "out of memory" in text.lower(), "shortfall_bytes": None}
    asked = re.search(r"Tried to allocate " + _SIZE, text)
    free = re.search(r"of which " + _SIZE + " is free", text)
    total = re.search(r"total capac\w* of " + _SIZE, text)
    if asked and free:
        out.update(asked_bytes=_bytes(*asked.groups()), free_bytes=_bytes(*free.groups()))
        out["shortfall_bytes"] = max(0.0, out["asked_bytes"] - out["free_bytes"])
    if total:
        out["gpu_total_bytes"] = _bytes(*total.groups())
    procs = re.findall(r"Process (\d+) has " + _SIZE + " memory in use", text)
    if procs:
        out["processes_bytes"] = {int(pid): _bytes(n, u) for pid, n, u in procs}
    this = re.search(r"this process has " + _SIZE + " memory in use", text)
    if this:
        out["failing_process_bytes"] = _bytes(*this.groups())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    out["message"] = next((line for line in reversed(lines) if "out of memory" in line.lower()), lines[-1] if lines
                          else "")[:600]
    return out


def smaller_depth(built: dict[str, Any], shortfall_bytes: float, layers: int, single_layers: int, *,
                  activation_bytes_per_block: float = 0.0, min_dual: int = 1,
                  margin: float = 1.2, spare_bytes: float = GIB) -> tuple[int, int] | None:
    """The deepest (dual, single) with dual : single kept near 1 : 2 whose removed blocks free the shortfall (with
    ``margin`` and ``spare_bytes``): each block removed frees its weights twice (the rollout copy and the
    learner's bf16 base) plus the learner's checkpointed input of the block. None when no depth frees enough."""
    dual_b = 2 * built["bytes_per_dual_block"] + activation_bytes_per_block
    single_b = 2 * built.get("bytes_per_single_block", 0) + activation_bytes_per_block
    need = shortfall_bytes * margin + spare_bytes
    for k in range(1, layers + single_layers + 1):
        d_cut = min(k, layers - min_dual)
        s_cut = min(2 * k, single_layers)
        if d_cut < 0 or (d_cut + s_cut == 0):
            return None
        if d_cut * dual_b + s_cut * single_b >= need:
            return layers - d_cut, single_layers - s_cut
        if d_cut == layers - min_dual and s_cut == single_layers:
            return None
    return None


def phase_row(scalars: dict[str, float]) -> dict[str, float]:
    """Seconds per phase of the step (and inside the rollout), and the learner's own compute seconds."""
    row = {p: scalars.get(f"time/{p}", math.nan) for p in PHASES + ROLLOUT_PARTS}
    row["learner_compute"] = scalars.get("learner/learn_seconds", math.nan)
    return row


# ---------------------------------------------------------------------------------------------- README
def _gib(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value / GIB:.1f}"


def _memory_rows(attempt: dict[str, Any]) -> list[str]:
    rows = ["| role | peak allocated (GiB) | peak reserved (GiB) | nvidia-smi (GiB) | load (s) |", "|---|---|---|---|---|"]
    smi = {int(k): v for k, v in (attempt.get("nvidia_smi_mib") or {}).items()}
    for role, reports in (attempt.get("memory") or {}).items():
        for i, m in enumerate(reports):
            used = smi.get(int(m["pid"]))
            rows.append(f"| {role} {i} | {_gib(m['gpu_max_allocated_bytes'])} | {_gib(m['gpu_max_reserved_bytes'])} | "
                        f"{_gib(used * 2**20 if used is not None else None)} | {m['load_seconds']:.1f} |")
    s, ready = attempt.get("scalars") or {}, attempt.get("learner_ready") or {}
    pid = int(ready.get("pid", -1))
    used = smi.get(pid)
    rows.append(f"| learner | {_gib(s.get('learner/gpu_max_allocated_bytes'))} | "
                f"{_gib(s.get('learner/gpu_max_reserved_bytes'))} | {_gib(used * 2**20 if used is not None else None)} | "
                f"{ready.get('load_seconds', math.nan):.1f} |")
    return rows


def markdown(result: dict[str, Any]) -> str:
    s, b = result["setup"], result["build"]
    p, prm, orm = b["policy"], b["prm"], b["orm"]
    lines = [f"# One full Euphonium step on one {s['device_name']}, every role through Ray", "",
             "Generated by `bench/gpu_fullsize.py`. Command:", "", f"    {result['command']}", "",
             f"`configs/hunyuan_kuberay.yaml` with sizes and paths for one machine: a group of {s['group']} at "
             f"{s['size']}x{s['size']}, {s['frames']} frames, {s['tokens']} text tokens, 16 SDE steps with RGG on "
             f"steps 12-15 from the PRM pool (gradient {s['prm_micro_batch']} samples at a time); LoRA rank "
             f"{s['lora_rank']} " + ("on a bf16 base" if s["share"] else "(fp32: bf16 applies on GPU only)")
             + "; the rollout worker, PRM pool, ORM pool and the Ray Train learner "
             + (f"each on {s['share']} of the GPU" if s["share"] else "on the CPU")
             + f"; the adapter broadcast through the object store. Random-init weights "
             f"(throughput and memory, not learning). torch {s['torch']}, Ray {s['ray']}.", "",
             "| model | parameters | on disk (GiB) | build (s) | write (s) | write GiB/s |", "|---|---|---|---|---|---|"]
    for name, r in ((f"HunyuanVideo transformer ({p['dtype']})", p), ("VAE", p["vae"]), (f"latent PRM, {prm['dual_blocks']} "
                    "dual blocks", prm), (f"ORM ({orm['size']}, InternVL + HPQA head)", orm)):
        lines.append(f"| {name} | {r['parameters'] / 1e9:.3f} B | {r['bytes'] / GIB:.1f} | {r['build_s']:.1f} | "
                     f"{r['write_s']:.1f} | {r['write_gib_per_s']:.2f} |")
    for a in result["attempts"]:
        lines += ["", f"## Depth {a['layers']} dual + {a['single_layers']} single blocks: "
                      + ("one step done" if a.get("ok") else "failed")]
        if a.get("startup_s") is not None:
            lines += ["", f"Ray start and model loading until the step began: {a['startup_s']:.1f} s; "
                          f"train() in all: {a.get('train_s', math.nan):.1f} s."]
        if a.get("scalars"):
            row = phase_row(a["scalars"])
            lines += ["", "| phase | seconds |", "|---|---|"]
            lines += [f"| {k} | {v:.2f} |" for k, v in row.items() if math.isfinite(v)]
            lines += ["", *_memory_rows(a)]
            if a.get("orm_failures"):
                lines += ["", f"The ORM could not score {a['orm_failures']} videos (NaN rewards; see its log)."]
        if not a.get("ok"):
            d = a.get("diagnosis") or {}
            what = (f"the {d.get('role')} role ran out of GPU memory: it asked for {_gib(d.get('asked_bytes'))} GiB "
                    f"with {_gib(d.get('free_bytes'))} GiB free, short by at least "
                    f"{_gib(d.get('shortfall_bytes'))} GiB (that one allocation)"
                    if d.get("shortfall_bytes") is not None else f"the {d.get('role')} role failed")
            lines += ["", f"Failure: {what}.", "", f"    {d.get('message', '')}"]
            names = {int(k): v for k, v in (a.get("pids") or {}).items()}
            held = d.get("processes_bytes") or {}
            if held:
                lines += ["", "GPU memory of every process at that moment (CUDA's message): " + ", ".join(
                    f"{names.get(int(pid), f'pid {pid}')} {_gib(b)} GiB" for pid, b in held.items())]
    return "\n".join(lines) + "\n"
