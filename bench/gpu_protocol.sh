#!/usr/bin/env bash
# bench/PROTOCOL.md on one GPU, start to end, with its pre-registered rules applied mechanically:
#   A. the baseline's grid (DanceGRPO; same_initial_noise x lr) on the pilot seeds -> bench/pilot_select.py baseline
#   B. the Euphonium variants (+ oracle controls) on the pilot seeds, at the chosen base -> pilot_select.py variant
#   C. the final run on the final seeds (5 methods on one task per command, 8 seeds per batched ensemble), beside it one
#      method again through the Ray driver on the same GPU.
# Every stage has a time limit, logs to $OUT as it goes and is packed into $OUT as soon as it ends.
# One GPU command (10 minutes at most) runs one part (PROTOCOL.md, amendment 1):
#   STAGE=pilots bash bench/gpu_protocol.sh               # A and B on the pilot tasks; the selections come back
#   STAGE=variants bash bench/gpu_protocol.sh             # B alone, once A's pair is committed in base.yaml
#   STAGE=final TASKS=centered bash bench/gpu_protocol.sh  # C on one task, after the selections are committed
#   STAGE=final TASKS=caption CANDIDATES="prominence steady" bash bench/gpu_protocol.sh  # + amendment 2's task pilot
#   STAGE=final TASKS=selected bash bench/gpu_protocol.sh  # C on the task that pilot chose
#   . /tmp/site/env.sh && OUT=out STAGE=... bash bench/gpu_protocol.sh
set -uo pipefail
export PYTHONUNBUFFERED=1  # a stage killed by its time limit keeps its log
OUT=${OUT:-outputs/protocol-out}
W=${WORK:-/tmp/protocol}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
PILOT_SEEDS=${PILOT_SEEDS:-"100 101 102 103"}
FINAL_SEEDS=${FINAL_SEEDS:-"1000 1001 1002 1003 1004 1005 1006 1007"}
PILOT_STEPS=${PILOT_STEPS:-40}
STAGE=${STAGE:-pilots}
PILOT_TASKS=${PILOT_TASKS:-"centered motion"}
TASKS=${TASKS:-centered}
FINAL_STEPS=${FINAL_STEPS:-60}
mkdir -p "$OUT" "$W"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/protocol.log"; }
pack() { tar -czf "$OUT/$1.tar.gz" -C "$W" --exclude='*/world/*' "${@:2}" 2>/dev/null && log "packed $1 ($(du -h "$OUT/$1.tar.gz" | cut -f1))"; }
EXTRA=(); for s in ${EXTRA_SETS:-}; do EXTRA+=(--set "$s"); done  # a dry run's smaller sizes
[ -n "${EVAL_SAMPLES:-}" ] && EXTRA+=(--eval-samples-per-prompt "$EVAL_SAMPLES")
BENCH=($PY -m euphonium_ray.cli bench convergence --device "$DEVICE")

PILOT=(--tasks $PILOT_TASKS)
if [ "$STAGE" = pilots ]; then
log "A: baseline grid, $PILOT_STEPS steps, pilot seeds $PILOT_SEEDS"
timeout ${NUM_TIMEOUT:-100} $PY bench/gpu_numerics.py --device "$DEVICE" --out "$W/numerics.json" \
  --work "$W/numerics-world" >"$W/numerics.log" 2>&1 &
grid=()
for noise in true false; do
  for lr in 1.0e-4 3.0e-4; do
    g="$W/grid-noise_$noise-lr_$lr"; grid+=("$g")
    timeout ${A_TIMEOUT:-190} "${BENCH[@]}" "${EXTRA[@]}" "${PILOT[@]}" --methods dance-grpo --seed-list $PILOT_SEEDS --seeds-per-unit 4 --workers ${A_WORKERS:-2} \
      --max-minutes ${A_MINUTES:-2.9} --set steps=$PILOT_STEPS --set sampler.same_initial_noise=$noise \
      --set optim.lr=$lr --out "$g" >"$g.log" 2>&1 &
  done
done
wait
grep -h "tf32=" "$W/numerics.log" | tee -a "$OUT/protocol.log"
$PY bench/pilot_select.py baseline --grid "${grid[@]}" --out "$W/selected_base" 2>&1 | tee -a "$OUT/protocol.log"
pack stage-a $(cd "$W" && ls -d grid-* numerics.json numerics.log selected_base.* 2>/dev/null)
[ -f "$W/selected_base.sets" ] || { log "no baseline selected: stop"; exit 1; }
SETS=(); while read -r s; do [ -n "$s" ] && SETS+=(--set "$s"); done <"$W/selected_base.sets"
fi
# STAGE=variants: stage B alone, after stage A's pair was committed into base.yaml (no --set needed).
if [ "$STAGE" = pilots ] || [ "$STAGE" = variants ]; then
[ "$STAGE" = variants ] && SETS=()

log "B: variants at ${SETS[*]}, $PILOT_STEPS steps"
timeout ${B_TIMEOUT:-320} "${BENCH[@]}" "${EXTRA[@]}" "${PILOT[@]}" --methods dance-grpo euph-credit euph-credit-half05 euph-credit-half20 \
  euph-credit-half20-glp euph-credit-half20-distill \
  --seed-list $PILOT_SEEDS --seeds-per-unit 4 --workers ${B_WORKERS:-12} --max-minutes ${B_MINUTES:-4.9} \
  --set steps=$PILOT_STEPS "${SETS[@]}" --out "$W/variants" >"$W/variants.log" 2>&1
$PY -m euphonium_ray.cli bench convergence --report-only --out "$W/variants" >/dev/null 2>&1
$PY bench/pilot_select.py variant --pilot "$W/variants" --out "$W/selected_variant" 2>&1 | tee -a "$OUT/protocol.log"
cp bench/configs/euphonium-best.yaml bench/configs/oracle-control.yaml "$W/" 2>/dev/null
cp "$W/selected_base.sets" "$W/selected_base.json" "$OUT/" 2>/dev/null
pack stage-b variants variants.log selected_variant.json euphonium-best.yaml oracle-control.yaml
[ -f bench/configs/euphonium-best.yaml ] || { log "no variant selected: stop"; exit 1; }
log "pilots done: commit the selections (base.yaml, euphonium-best.yaml, oracle-control.yaml), then STAGE=final"
exit 0
fi

# Amendment 2: CANDIDATES="prominence steady" beside a final command trains each candidate task's PRM and pilots
# DanceGRPO on it (pilot seeds, the final's budget); pilot_select.py task picks the one the final runs next
# (TASKS=selected reads that choice and puts its PRM where benchmark.yaml expects it).
if [ -n "${CANDIDATES:-}" ]; then
  (
    $PY -m euphonium_ray.cli toy build "$W/toy-model" >"$W/toy-build.log" 2>&1
    for c in $CANDIDATES; do
      timeout ${PRM_TIMEOUT:-420} $PY -m euphonium_ray.cli train-prm --model "$W/toy-model" \
        --prompts "$W/toy-model/embeddings/videos2caption.json" --orm "toy-$c" --out "$W/prm-$c" --rollouts ${PRM_ROLLOUTS:-2048} \
        --group-size 8 --dual-blocks 2 --single-blocks 2 --epochs ${PRM_EPOCHS:-20} --device "$DEVICE" --config configs/toy.yaml \
        --set sampler.same_initial_noise=false >"$W/prm-$c.log" 2>&1 &
    done
    timeout ${T_TIMEOUT:-480} "${BENCH[@]}" "${EXTRA[@]}" --tasks $CANDIDATES --methods dance-grpo --seed-list $PILOT_SEEDS \
      --seeds-per-unit 4 --workers 2 --max-minutes ${T_MINUTES:-7.2} --set steps=$FINAL_STEPS --out "$W/task-pilot" \
      >"$W/task-pilot.log" 2>&1
    wait
    $PY -m euphonium_ray.cli bench convergence --report-only --out "$W/task-pilot" >"$W/task-pilot-report.log" 2>&1
    $PY bench/pilot_select.py task --pilot "$W/task-pilot" --prms $(for c in $CANDIDATES; do echo "$W/prm-$c"; done) \
      --out "$W/selected_task" >"$W/selected_task.log" 2>&1
  ) &
  CAND_PID=$!
fi
if [ "$TASKS" = selected ]; then
  [ -f "$W/selected_task.txt" ] || { log "no $W/selected_task.txt: run a final command with CANDIDATES first"; exit 2; }
  TASKS=$(cat "$W/selected_task.txt")
  [ -d "euphonium_ray/toy/assets/prm-$TASKS" ] || cp -r "$W/prm-$TASKS" "euphonium_ray/toy/assets/prm-$TASKS"
  log "task chosen by the candidates' pilot: $TASKS (PRM from $W/prm-$TASKS)"
fi

# C: the selections are committed in bench/configs/ (base.yaml carries the chosen baseline pair): no --set here.
for f in euphonium-best oracle-control; do
  [ -f "bench/configs/$f.yaml" ] || { log "bench/configs/$f.yaml is missing: run and commit STAGE=pilots first"; exit 2; }
done
SETS=(--set steps=$FINAL_STEPS)
log "C: final on $TASKS, $FINAL_STEPS steps, final seeds $FINAL_SEEDS; and dance-grpo/centered/seed 1000 through Ray beside it"
GPU_SHARES=(); [ "$DEVICE" = cuda ] && GPU_SHARES=(--set cluster.rollout_gpus=0.2 --set cluster.learner_gpus=0.2 \
  --set cluster.orm_gpus=0.1 --set cluster.prm_gpus=0.1)
[ "$TASKS" = centered ] && timeout ${RAY_TIMEOUT:-400} "${BENCH[@]}" "${EXTRA[@]}" --ray --methods dance-grpo --tasks centered --seed-list 1000 \
  "${SETS[@]}" --set cluster.num_cpus=${RAY_CPUS:-8} "${GPU_SHARES[@]}" --out "$W/final-ray" >"$W/final-ray.log" 2>&1 &
timeout ${C_TIMEOUT:-520} "${BENCH[@]}" "${EXTRA[@]}" --tasks $TASKS --methods flow-grpo dance-grpo euphonium euphonium-best oracle-control \
  --seed-list $FINAL_SEEDS --seeds-per-unit 8 --workers ${C_WORKERS:-5} --max-minutes ${C_MINUTES:-8.2} \
  "${SETS[@]}" --out "$W/final" >"$W/final.log" 2>&1
$PY -m euphonium_ray.cli bench convergence --report-only --out "$W/final" >"$W/final-report.log" 2>&1
wait
[ "$TASKS" = centered ] && $PY -m euphonium_ray.cli bench convergence --report-only --out "$W/final-ray" >"$W/final-ray-report.log" 2>&1
grep -E "^### task|^\| (flow|dance|euphonium|oracle)" "$W/final-report.log" | tee -a "$OUT/protocol.log"
pack "final-$TASKS" final final.log final-report.log final-ray final-ray.log final-ray-report.log
if [ -n "${CAND_PID:-}" ]; then
  wait "$CAND_PID" 2>/dev/null  # (the final's own wait may have reaped it already)
  cat "$W/selected_task.log" | tee -a "$OUT/protocol.log"
  for c in $CANDIDATES; do log "prm $c: $(tail -1 "$W/prm-$c.log")"; done
  pack candidates task-pilot task-pilot.log task-pilot-report.log selected_task.json selected_task.txt \
    selected_task.log $(cd "$W" && ls -d prm-* prm-*.log 2>/dev/null)
fi
log "done"
