#!/usr/bin/env bash
# Install what scripts/pack_gpu_deps.sh packed, on a machine without network, and check that it imports.
#
#   bash scripts/gpu_bootstrap.sh [--deps DIR] [--target DIR] [--log-dir DIR] [--ray-only] && . /tmp/site/env.sh
#   source scripts/gpu_bootstrap.sh            # the same, and the environment lands in this shell
#
# Every stage is logged with a timestamp to LOG_DIR/bootstrap.log as it happens (default: $OUT, else
# outputs/gpu_bootstrap), so a hang later in the same command still leaves the log. Unpacks Ray into TARGET
# (default /tmp/site; skipped when the same pack is already there), installs the wheels with pip --no-index
# --no-deps --target, writes TARGET/env.sh (PYTHONPATH with TARGET and the repository, RAY_AUTH_MODE=disabled, no
# usage stats, offline Hugging Face, NVLink multicast off), then imports every module a run needs in a fresh
# process, and reports /dev/shm, CPUs, memory and the GPU. --ray-only: leave torch and the project out of the
# import check (the CPU test of the pack, where python3.12 has no torch). Exit status 1 if an import fails.

_euphonium_bootstrap() (
  set -uo pipefail
  local root deps target log_dir py ray_only=0 t0
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  deps=$root/.gpu_deps
  target=${EUPHONIUM_SITE:-/tmp/site}
  log_dir=${OUT:-$root/outputs/gpu_bootstrap}
  py=${PYTHON:-python3}
  while [ $# -gt 0 ]; do
    case $1 in
      --deps) deps=$2; shift 2 ;;
      --target) target=$2; shift 2 ;;
      --log-dir) log_dir=$2; shift 2 ;;
      --ray-only) ray_only=1; shift ;;
      *) echo "gpu_bootstrap: unknown argument $1" >&2; return 2 ;;
    esac
  done
  mkdir -p "$log_dir" "$target" || return 1
  local log=$log_dir/bootstrap.log
  t0=$(date +%s.%N)
  say() {
    local now; now=$(date +%s.%N)
    printf '%s +%7ss %s\n' "$(date '+%F %T')" "$(awk -v a="$now" -v b="$t0" 'BEGIN { printf "%.2f", a - b }')" "$*" \
      | tee -a "$log"
  }
  run() { say "\$ $*"; "$@" 2>&1 | sed 's/^/    /' | tee -a "$log"; return "${PIPESTATUS[0]}"; }

  say "stage machine: $(uname -srm), $(nproc) CPUs, python $($py -c 'import sys; print(sys.version.split()[0], sys.executable)')"
  run grep -E '^(MemTotal|MemAvailable|Shmem)' /proc/meminfo
  run df -h /dev/shm /tmp "$target"
  say "ulimit -n $(ulimit -n); addresses: $(hostname -I 2>/dev/null || echo '?'); RAY_* set: $(env | grep -o '^RAY_[A-Z_]*' | tr '\n' ' ')"
  if command -v nvidia-smi >/dev/null; then
    run timeout 30 nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
  else
    say "no nvidia-smi: CPU only"
  fi

  [ -f "$deps/MANIFEST.txt" ] || { say "error: $deps/MANIFEST.txt not found: run scripts/pack_gpu_deps.sh and carry $deps"; return 1; }
  local tarball; tarball=$(ls "$deps"/ray-*.tar.xz 2>/dev/null | head -1)
  [ -n "$tarball" ] || { say "error: no ray-*.tar.xz in $deps"; return 1; }
  local stamp=$target/.euphonium-pack
  if [ -f "$stamp" ] && cmp -s "$stamp" "$deps/MANIFEST.txt"; then
    say "stage unpack: $target already holds this pack; skipped"
  else
    say "stage unpack: $(basename "$tarball") ($(du -h "$tarball" | cut -f1)) into $target"
    if command -v xz >/dev/null; then
      run tar -C "$target" -xJf "$tarball" || { say "error: unpacking $tarball failed"; return 1; }
    else  # no xz binary: Python's own lzma (file modes kept: raylet and gcs_server must stay executable)
      say "no xz on PATH: unpacking with Python's tarfile"
      run "$py" -c 'import sys, tarfile; t = tarfile.open(sys.argv[1]); t.extractall(sys.argv[2], **({"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}))' \
        "$tarball" "$target" || { say "error: unpacking $tarball failed"; return 1; }
    fi
    say "stage wheels: $(ls "$deps"/wheels/*.whl | wc -l) wheels"
    run "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
      "$deps"/wheels/*.whl || { say "error: pip install --target $target failed"; return 1; }
    cp "$deps/MANIFEST.txt" "$stamp"
  fi

  cat > "$target/env.sh" <<EOF
# written by scripts/gpu_bootstrap.sh
export PYTHONPATH=$target:$root\${PYTHONPATH:+:\$PYTHONPATH}
export PATH=$target/bin:\$PATH
export RAY_AUTH_MODE=\${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=\${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=\${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1} NVSHMEM_DISABLE_NVLS=\${NVSHMEM_DISABLE_NVLS:-1}
EOF
  say "stage env: wrote $target/env.sh"

  say "stage imports (a fresh process with env.sh, as Ray's workers will see it)"
  (. "$target/env.sh" && cd /tmp && RAY_ONLY=$ray_only timeout 300 "$py" - <<'EOF') 2>&1 | tee -a "$log"
import importlib, importlib.metadata as md, os, sys, time

ray_only = os.environ.get("RAY_ONLY") == "1"
required = ["ray", "ray.train", "ray.tune", "ray.util.placement_group", "pydantic", "jsonschema", "tensorboardX",
            "yaml", "numpy", "pandas", "pyarrow"]
if not ray_only:
    required += ["torch", "ray.train.torch", "diffusers", "transformers", "peft", "safetensors", "tensorboard", "PIL", "imageio",
                 "matplotlib", "euphonium_ray.driver", "actors.system", "actors.learner"]
failed = []
for name in required:
    t = time.perf_counter()
    try:
        mod = importlib.import_module(name)
        where = os.path.dirname(getattr(mod, "__file__", "") or "?")
        print(f"    ok   {name:<26} {time.perf_counter() - t:6.2f}s  {where}")
    except Exception as exc:  # noqa: BLE001 - every failure is reported, then the status says so
        failed.append(name)
        print(f"    FAIL {name:<26} {type(exc).__name__}: {exc}")
for dist in ("ray", "pydantic", "pydantic_core", "typing_extensions", "diffusers", "packaging", "grpcio", "aiohttp",
             "torch"):
    try:
        print(f"    version {dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"    version {dist} (not installed)")
try:  # what Ray itself asks for (core and the train extra): a version mismatch shows here, not in a worker
    from packaging.requirements import Requirement
    env = {"extra": ""}
    for line in md.requires("ray") or []:
        req = Requirement(line)
        extras = [e for e in ("", "train") if req.marker is None or req.marker.evaluate({"extra": e})]
        if not extras:
            continue
        try:
            have = md.version(req.name)
            ok = req.specifier.contains(have, prereleases=True)
            print(f"    ray needs {line.split(';')[0]:<32} have {have}{'' if ok else '  <-- MISMATCH'}")
        except md.PackageNotFoundError:
            print(f"    ray needs {line.split(';')[0]:<32} MISSING")
            failed.append(req.name)
except Exception as exc:  # noqa: BLE001
    print(f"    requirement check skipped: {exc}")
try:
    import ray.dashboard.optional_deps  # noqa: F401
    print("    Ray node agent: full mode (dashboard dependencies importable)")
except ImportError as exc:
    print(f"    Ray node agent: --minimal mode ({exc}); expected without the dashboard extras")
if not ray_only:
    import torch
    cuda = torch.cuda.is_available()
    print(f"    torch {torch.__version__}, cuda available {cuda}"
          + (f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if cuda else ""))
print("    imports: " + ("all ok" if not failed else "FAILED: " + ", ".join(failed)))
sys.exit(1 if failed else 0)
EOF
  local status=${PIPESTATUS[0]}
  say "stage done: status $status; use: . $target/env.sh"
  return "$status"
)

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then  # sourced: install, then take the environment into this shell
  _euphonium_bootstrap "$@" && . "${EUPHONIUM_SITE:-/tmp/site}/env.sh"
else
  _euphonium_bootstrap "$@"
fi
