#!/usr/bin/env bash
# Pretrain the toy policy on a GPU and copy back its transformer folder (how the committed model was made).
#   gpu_pretrain.sh OUT TAG STEPS BATCH [extra toy-build args...]
# Builds /tmp/TAG (committed text side, fresh embeddings), pretrains STEPS steps of batch BATCH with the config's
# other knobs (configs/toy.yaml), and writes OUT/TAG.safetensors, OUT/TAG.config.json, OUT/TAG.info.json
# (pretrain_info.json: device, steps, seconds, loss curve) and OUT/TAG.log.
set -euo pipefail
OUT=$1; TAG=$2; STEPS=$3; BATCH=$4; shift 4
M=/tmp/$TAG
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m euphonium_ray.cli toy build "$M" --retrain --device cuda --steps "$STEPS" --batch "$BATCH" "$@" 2>&1 \
  | grep -v -e "Loading weights" -e "Writing model" | awk 'NR % 10 == 1 || !/^step /' | tee "$OUT/$TAG.log"
cp "$M/transformer/diffusion_pytorch_model.safetensors" "$OUT/$TAG.safetensors"
cp "$M/transformer/config.json" "$OUT/$TAG.config.json"
cp "$M/transformer/pretrain_info.json" "$OUT/$TAG.info.json"
