#!/usr/bin/env bash
# Source at the start of a GPU command (the GPU machine has torch but no diffusers/pydantic and no network):
# installs the wheels carried in .whl/ into /tmp/site and puts it and the repository on PYTHONPATH.
#   . bench/gpu_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_env: wheel install failed"; return 1 2>/dev/null || exit 1; }
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
python3 -c "import torch, diffusers, pydantic, euphonium_ray.cli; print('gpu_env: torch', torch.__version__, 'diffusers', diffusers.__version__, 'pydantic', pydantic.__version__, 'cuda', torch.cuda.is_available())"
