#!/usr/bin/env bash
# Commit the pilots' selections (bench/PROTOCOL.md, amendment 1, item 5) from what `STAGE=pilots bash
# bench/gpu_protocol.sh` brought back in FILES: the baseline pair into bench/configs/base.yaml, the chosen variant's
# euphonium-best.yaml and oracle-control.yaml into bench/configs/, the selection logs into
# bench/results/convergence/pilots/; then one commit, before any final command runs.
#   bash bench/apply_pilots.sh FILES
set -euo pipefail
FILES=${1:?usage: bash bench/apply_pilots.sh FILES (the folder the pilots command returned)}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
DEST=$ROOT/bench/results/convergence/pilots
[ -f "$FILES/stage-b.tar.gz" ] || { echo "apply_pilots: $FILES/stage-b.tar.gz is missing: stage B did not finish" >&2; exit 2; }
tmp=$(mktemp -d)
tar -xzf "$FILES/stage-b.tar.gz" -C "$tmp" euphonium-best.yaml oracle-control.yaml selected_variant.json
cp "$tmp/euphonium-best.yaml" "$tmp/oracle-control.yaml" "$ROOT/bench/configs/"
# STAGE=variants brings no baseline pair back: it was committed into base.yaml after stage A
[ -f "$FILES/selected_base.sets" ] && "$PY" "$ROOT/bench/pilot_select.py" apply --sets "$FILES/selected_base.sets"
mkdir -p "$DEST"
cp "$tmp/selected_variant.json" "$DEST/"
for f in selected_base.json selected_base.sets protocol.log; do [ -f "$FILES/$f" ] && cp "$FILES/$f" "$DEST/"; done
rm -rf "$tmp"
cd "$ROOT" && git add bench/configs/base.yaml bench/configs/euphonium-best.yaml bench/configs/oracle-control.yaml "$DEST" \
  && git commit -q -m "Protocol amendment 1, item 5: the pilots' selections, committed before any final command" \
  && git log --oneline -1
