#!/usr/bin/env bash
# Pilot stage A on one GPU (bench/PROTOCOL.md, "Pilots"): GPU numerics, one latent PRM per task, and the
# baseline's hyperparameter grid on the pilot seeds. Every stage has a time limit and logs to $OUT as it goes;
# the results are packed into $OUT/pilot-a.tar.gz at the end.
#
#   OUT=out bash bench/gpu_pilot.sh          (on the GPU machine, after bench/gpu_env.sh set up PYTHONPATH)
set -uo pipefail
OUT=${OUT:-outputs/pilot-a-out}
W=${WORK:-/tmp/pilot-a}
mkdir -p "$OUT" "$W"
PY=${PY:-python3}
STEPS=${PILOT_STEPS:-100}
SEEDS=${PILOT_SEEDS:-"100 101 102 103"}
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/pilot.log"; }

log "stage 0: world"
$PY -m euphonium_ray.cli toy build "$W/toy-model" >"$W/build.log" 2>&1 || { log "toy build failed"; tail -20 "$W/build.log" | tee -a "$OUT/pilot.log"; }
EMB="$W/toy-model/embeddings/videos2caption.json"

log "stage 1+2: numerics (first-update ratio, TF32 off/on) and one latent PRM per task, in parallel"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee -a "$OUT/pilot.log"
timeout ${NUM_TIMEOUT:-150} $PY bench/gpu_numerics.py --device ${DEVICE:-cuda} --out "$W/numerics.json" \
  --work "$W/numerics-world" >"$W/numerics.log" 2>&1 &
for task in caption centered motion; do
  timeout ${PRM_TIMEOUT:-180} $PY -m euphonium_ray.cli train-prm --model "$W/toy-model" --prompts "$EMB" \
    --orm "toy-$task" --out "$W/prm-$task" --rollouts ${PRM_ROLLOUTS:-2048} --group-size 8 --dual-blocks 2 --single-blocks 2 \
    --epochs ${PRM_EPOCHS:-20} --device ${DEVICE:-cuda} --config configs/toy.yaml --set sampler.same_initial_noise=false \
    >"$W/prm-$task.log" 2>&1 &
done
wait
grep -E "tf32=" "$W/numerics.log" | tee -a "$OUT/pilot.log"
for task in caption centered motion; do log "prm $task: $(tail -1 "$W/prm-$task.log")"; done

log "stage 3: baseline grid (dance-grpo; same_initial_noise x lr), $STEPS steps, seeds $SEEDS"
for noise in true false; do
  for lr in 1.0e-4 3.0e-4; do
    timeout ${GRID_TIMEOUT:-300} $PY -m euphonium_ray.cli bench convergence --methods dance-grpo \
      --seed-list $SEEDS --seeds-per-unit 4 --device ${DEVICE:-cuda} --workers 3 --max-minutes ${GRID_MINUTES:-4.2} \
      --set steps=$STEPS --set sampler.same_initial_noise=$noise --set optim.lr=$lr \
      --out "$W/grid-noise_$noise-lr_$lr" >"$W/grid-noise_$noise-lr_$lr.log" 2>&1 &
  done
done
wait
for f in "$W"/grid-*.log; do log "$(basename "$f"): $(grep -E 'eval @ step' "$f" | tail -3 | tr '\n' ' ')"; done

log "pack"
tar -czf "$OUT/pilot-a.tar.gz" -C "$W" --exclude='*/world/*' --exclude='toy-model' --exclude='numerics-world' . \
  && log "packed $(du -h "$OUT/pilot-a.tar.gz" | cut -f1)"
