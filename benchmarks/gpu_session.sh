#!/usr/bin/env bash
# The GPU measurements of HandCLIP as one script (issue 14), for a machine with one CUDA GPU and a time limit:
#   1. the CUDA tests, 2. `python -m handclip.bench`, 3. bf16 vs fp32 end to end (tiny and ViT-B/32, 2 epochs),
#   4. the default recipe on 11k-sized synthetic data for all four hand types x 50 epochs, then `make eval`'s
#   evaluation, each step timed, under one overall deadline.
#
#   bash benchmarks/gpu_session.sh OUT_DIR                          # from the repository root
#   TRAINER=cpu SCALE=tiny bash benchmarks/gpu_session.sh /tmp/out  # a dry run of the script on a CPU
#
# OUT_DIR receives at most 8 files: steps.tsv (each step: exit status, seconds), summary.json (the figures the
# README quotes), the benchmark's result file and gpu_session.tar.gz (logs, metrics, evaluation reports; no
# checkpoints or data). Nothing is written into the repository.
set -u -o pipefail

OUT=${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR}
BUDGET=${BUDGET:-588}          # seconds for the whole script
TRAINER=${TRAINER:-gpu}        # trainer config of the training runs
SCALE=${SCALE:-full}           # full | tiny (a dry run: small data, tiny model, few epochs)
W=${WORK:-/tmp/handclip-gpu}   # scratch: data, caches, run outputs
HANDS=dorsal_right,dorsal_left,palmar_right,palmar_left
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
START=$(date +%s)
DEADLINE=$((START + BUDGET))

rm -rf "$W" && mkdir -p "$W/logs" "$OUT"
STEPS=$W/steps.tsv
printf 'step\trc\tseconds\tstarted_s\n' > "$STEPS"

if [ "$SCALE" = full ]; then
  E2E_MODELS=tiny,vit_b32; E2E_EPOCHS=2
  FULL_SUBJECTS=190; FULL_PER_ASPECT=10; FULL_SIZE=800x600; FULL_MODEL=vit_b32; FULL_EPOCHS=50
  BENCH_ARGS=""
else
  E2E_MODELS=tiny; E2E_EPOCHS=2
  FULL_SUBJECTS=12; FULL_PER_ASPECT=4; FULL_SIZE=320x240; FULL_MODEL=tiny; FULL_EPOCHS=2
  BENCH_ARGS="bench.quick=true bench.parts=[train,eval]"
fi

# step NAME LIMIT CMD...: run CMD with at most LIMIT seconds (less when the deadline is nearer), log, time it.
step() {
  local name=$1 limit=$2; shift 2
  local now; now=$(date +%s)
  local left=$((DEADLINE - now - 25))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    printf '%s\tskipped\t0\t%s\n' "$name" "$((now - START))" >> "$STEPS"; echo "=== $name: skipped (no time left)"
    return 1
  fi
  echo "=== $name (at most ${limit} s, t=$((now - START)) s)"
  local t0; t0=$(date +%s.%N)
  timeout -k 5 "$limit" "$@" > "$W/logs/$name.log" 2>&1
  local rc=$?
  local secs; secs=$($PY -c "import sys; print(round($(date +%s.%N) - $t0, 1))")
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$((now - START))" >> "$STEPS"
  echo "    rc=$rc in ${secs} s"; tail -n 4 "$W/logs/$name.log" | cut -c1-300 | sed 's/^/    | /'
  return $rc
}

pack() {
  trap - EXIT INT TERM
  $PY - "$W" > "$W/summary.json" 2> "$W/logs/summary.log" <<'EOF'
import csv, json, sys
from pathlib import Path

w = Path(sys.argv[1])
out = {"steps": {}}
for row in csv.DictReader((w / "steps.tsv").open(), delimiter="\t"):
    out["steps"][row["step"]] = {"rc": row["rc"], "seconds": float(row["seconds"])}

def last_val(metrics_csv):
    rows = [r for r in csv.DictReader(metrics_csv.open()) if r.get("val/rank1")]
    return {k: float(rows[-1][k]) for k in ("epoch", "val/rank1", "val/loss", "val/acc") if rows and rows[-1].get(k)}

for root in ("e2e", "full"):
    runs = {}
    for metrics in sorted((w / root).glob("**/train/*/logs/*/metrics.csv")):
        run = metrics.parents[3].relative_to(w / root).as_posix() or "."
        runs[f"{run}/{metrics.parents[2].name}"] = last_val(metrics)
    for report in sorted((w / root).glob("**/eval/*.json")):
        data = json.loads(report.read_text())
        figures = {}
        for entry in data.get("entries", []) if isinstance(data, dict) else []:
            summary = entry.get("summary") or {}
            figures[f"{entry.get('hand')}/{entry.get('model', entry.get('kind', '?'))}"] = {
                k: (v.get("mean") if isinstance(v, dict) else v) for k, v in summary.items()
                if k in ("rank1", "rank5", "mAP")}
        runs[str(report.relative_to(w / root))] = figures
    out[root] = runs
print(json.dumps(out, indent=1))
EOF
  cp "$W/steps.tsv" "$W/summary.json" "$OUT/" 2>/dev/null
  cp "$W"/results/*.json "$OUT/" 2>/dev/null
  tar czf "$OUT/gpu_session.tar.gz" -C "$W" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='cache*' \
    --exclude='data' --exclude='*.npy' --exclude='*.u8' logs steps.tsv summary.json $(cd "$W" && ls -d results e2e full 2>/dev/null)
  if [ "$(stat -c %s "$OUT/gpu_session.tar.gz")" -gt 15000000 ]; then  # the tool returns files up to 16 MiB
    tar czf "$OUT/gpu_session.tar.gz" -C "$W" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='cache*' \
      --exclude='data' --exclude='*.npy' --exclude='*.u8' --exclude='*.png' logs steps.tsv summary.json \
      $(cd "$W" && ls -d results e2e full 2>/dev/null)
  fi
  echo "=== packed into $OUT at t=$(( $(date +%s) - START )) s"
}
trap pack EXIT
trap 'exit 130' INT TERM

# -- 0. the machine --------------------------------------------------------------------------------------------
step machine 30 bash -c "nvidia-smi; $PY -c 'import torch, pytorch_lightning, open_clip, hydra; print(torch.__version__, \
torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"-\", \
pytorch_lightning.__version__, open_clip.__version__, hydra.__version__)'; nproc; free -g; df -h /tmp"

# -- 1. the tests that need CUDA ---------------------------------------------------------------------------------
step cuda_tests 90 $PY -m pytest -q -p no:cacheprovider -x tests/test_metrics.py -k cuda

# -- 2. the benchmark (alone on the machine) -----------------------------------------------------------------------
# shellcheck disable=SC2086
step bench 220 $PY -m handclip.bench "bench.out_dir=$W/results" "bench.scratch_dir=$W/cache-bench" $BENCH_ARGS

# 11k-sized synthetic hands for step 4, made in the background while step 3 runs (it is not timed for speed)
( $PY -m handclip.synth --out "$W/data/d11k/raw" --subjects $FULL_SUBJECTS --images-per-aspect $FULL_PER_ASPECT \
    --size $FULL_SIZE --workers "$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))" --force \
  && $PY -m handclip.prepare --raw "$W/data/d11k/raw" --out "$W/data/d11k/splits" --force ) \
  > "$W/logs/data11k.log" 2>&1 &
DATA11K=$!
D11K_T0=$(date +%s)

# -- 3. bf16 vs fp32, tiny and ViT-B/32, 2 epochs, one hand type, then their evaluation ---------------------------
step demo_data 60 bash -c "$PY -m handclip.synth --out $W/data/demo/raw --subjects 40 --images-per-aspect 10 --force \
  && $PY -m handclip.prepare --raw $W/data/demo/raw --out $W/data/demo/splits --force"
E2E=(experiment=demo "trainer=$TRAINER" hand=dorsal_right "model=$E2E_MODELS" "trainer.precision=bf16-mixed,32-true"
     model.pretrained=null "paths.data_dir=$W/data/demo/splits" "paths.cache_dir=$W/cache"
     "paths.output_root=$W/e2e/\${model.model_name}/\${trainer.precision}" data.progress=false)
step e2e_train 90 $PY -m handclip.train -m "${E2E[@]}" "trainer.max_epochs=$E2E_EPOCHS" trainer.enable_progress_bar=false
step e2e_eval 50 $PY -m handclip.eval -m "${E2E[@]}" verification.pictures=false \
  "ckpt_path=\${paths.output_root}/train/dorsal_right/checkpoints/best.ckpt"

# -- 4. the paper's experiment: 4 hand types x 50 epochs, default recipe, then make eval's evaluation --------------
step data11k_wait 150 bash -c "while kill -0 $DATA11K 2>/dev/null; do sleep 1; done"
wait $DATA11K
printf 'data11k\t%s\t%s\t-\n' "$?" "$(( $(date +%s) - D11K_T0 ))" >> "$STEPS"
FULL=("model=$FULL_MODEL" model.pretrained=null "paths.data_dir=$W/data/d11k/splits" "paths.cache_dir=$W/cache11k"
      "paths.output_root=$W/full" data.progress=false)
step cache11k 120 $PY - "$W/data/d11k/splits" "$W/cache11k" "$FULL_MODEL" <<'EOF'
# Build the crop cache of every split of the four hand types (what training and evaluation would build first).
import sys, time
from handclip.data.datamodule import HandDataModule
from handclip.data.layout import available_hands
from handclip.models.clip import preprocess_config
root, cache, model = sys.argv[1:4]
name = {"tiny": "HandCLIP-Tiny", "vit_b32": "ViT-B-32-quickgelu"}[model]
start, images = time.perf_counter(), 0
for hand in available_hands(root):
    dm = HandDataModule(root, hand, preprocess_config(name, None), cache_dir=cache, progress=False)
    dm.prepare_data()
    test = dm.test_images()
    dm.image_dataloader(test.paths)
    images += len(dm._listing()[1]) + len(dm._listing()[2]) + len(test.paths)
print(f"cached {images} images in {time.perf_counter() - start:.1f} s")
EOF
step full_train 240 $PY -m handclip.train -m "hand=$HANDS" "${FULL[@]}" "trainer=$TRAINER" \
  "trainer.max_epochs=$FULL_EPOCHS" trainer.enable_progress_bar=false +trainer.profiler=simple
step full_eval 150 $PY -m handclip.eval all=true "${FULL[@]}"
exit 0
