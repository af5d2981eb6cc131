#!/usr/bin/env bash
# Pack what a GPU machine without network lacks for `euphonium-ray train` into one folder (default .gpu_deps/,
# git-ignored) that travels with the working tree; scripts/gpu_bootstrap.sh installs it there.
#
#   bash scripts/pack_gpu_deps.sh [DEST]          # PY_VERSION=3.12 by default (the GPU machine's Python)
#
# What goes in, for a machine that already has torch, transformers, peft, safetensors, numpy, pandas, pyarrow,
# aiohttp, grpcio, protobuf, msgpack, pyyaml, requests, click, filelock, fsspec, prometheus-client, tensorboard
# (docs/gpu.md lists the reasoning):
#   ray-<v>-<py>.tar.xz   Ray's wheel unpacked without ray/jars (Java) and ray/rllib, recompressed (the wheel
#                         itself is ~76 MiB, over what one run may carry)
#   wheels/*.whl          Ray's and the project's runtime needs that the machine lacks (pinned below)
#   MANIFEST.txt          name, bytes and sha256 of each file, for the bootstrap's log
# Left out on purpose: Ray's dashboard extras (aiohttp_cors, opencensus, opentelemetry-*, colorful, py-spy,
# smart_open, virtualenv). Without aiohttp_cors/opencensus Ray starts its node agent in --minimal mode, which needs
# nothing beyond core Ray; the runtime-env agent brings its own aiohttp inside the wheel. A partial set would be
# worse than none: the agent would start in full mode and die on the first missing module, taking the raylet down.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$ROOT/.gpu_deps}
PY_VERSION=${PY_VERSION:-3.12}
PY_TAG=cp${PY_VERSION/./}
RAY_VERSION=${RAY_VERSION:-2.60.0}
CACHE=${EUPHONIUM_PACK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/euphonium-gpu-deps/$PY_TAG}
LIMIT_MIB=64

# Ray's own needs (click, filelock, msgpack, packaging, protobuf, pyyaml, requests are on the machine) and those
# of ray[train] (pandas, pyarrow, fsspec are there): jsonschema and its three, pydantic and its four, tensorboardX.
# The project: diffusers (importlib_metadata, in its Requires-Dist, is imported only on Python < 3.8).
# typing_extensions: pydantic 2.14 needs >= 4.16 and the machine's version is not known; a newer one is safe.
WHEELS=(
  diffusers==0.42.1
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  jsonschema==4.26.0 referencing==0.37.0 rpds-py==2026.9.1 jsonschema-specifications==2025.9.1
  tensorboardX==2.6.5
)

say() { printf '[pack %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$@" 2>&1 | grep -v "is ignored: it is neither" || true
}

mkdir -p "$CACHE" "$DEST"
say "Ray $RAY_VERSION for $PY_TAG into $DEST (downloads cached in $CACHE)"
download "$CACHE" "ray==$RAY_VERSION"
RAY_WHEEL=$(ls "$CACHE"/ray-"$RAY_VERSION"-"$PY_TAG"-*.whl 2>/dev/null | head -1)
[ -n "$RAY_WHEEL" ] || { echo "error: no Ray $RAY_VERSION wheel for $PY_TAG was downloaded into $CACHE" >&2; exit 1; }

RAY_TAR="$DEST/ray-$RAY_VERSION-$PY_TAG.tar.xz"
if [ ! -s "$RAY_TAR" ] || [ "$RAY_WHEEL" -nt "$RAY_TAR" ]; then
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  say "unpacking $(basename "$RAY_WHEEL") without ray/jars and ray/rllib"
  python3 - "$RAY_WHEEL" "$WORK" <<'EOF'
import sys, zipfile
from pathlib import Path

wheel, out = sys.argv[1], Path(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if info.filename.startswith(("ray/jars/", "ray/rllib/")):
            continue
        path = Path(z.extract(info, out))
        mode = (info.external_attr >> 16) & 0o777
        if mode:  # keep the executable bits of raylet, gcs_server and friends
            path.chmod(mode)
EOF
  say "compressing (xz -9, a minute or two)"
  tar -C "$WORK" -cf - ray "ray-$RAY_VERSION.dist-info" | xz -9 -T1 > "$RAY_TAR.part"
  mv "$RAY_TAR.part" "$RAY_TAR"
fi

rm -rf "$DEST/wheels"
mkdir -p "$DEST/wheels"
download "$CACHE" "${WHEELS[@]}"
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}; version=${spec#*==}
  pattern=$(echo "$name" | tr 'A-Z-' 'a-z_')
  found=$(ls "$CACHE" | awk -v p="$pattern-$version-" 'tolower($0) ~ "^"p && /\.whl$/' | head -1)
  [ -n "$found" ] || { echo "error: no wheel for $spec in $CACHE" >&2; exit 1; }
  cp "$CACHE/$found" "$DEST/wheels/"
done

(cd "$DEST" && find . -type f ! -name MANIFEST.txt | sort | while read -r f; do
   printf '%s %s %s\n' "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -c1-16)" "${f#./}"; done) > "$DEST/MANIFEST.txt"

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
say "contents:"
while read -r bytes sha name; do printf '  %10s  %s\n' "$(mib "$bytes")" "$name"; done < "$DEST/MANIFEST.txt"
deps=$(du -sb "$DEST" | cut -f1)
tree=$(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null \
       | awk '{ s += $1 } END { print s + 0 }')
total=$((deps + tree))
say "packed $(mib "$deps"); working tree (tracked + untracked, not ignored) $(mib "$tree"); together $(mib "$total") of ${LIMIT_MIB} MiB"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "error: $(mib "$total") is over the ${LIMIT_MIB} MiB a GPU run may carry" >&2
  exit 1
fi
