#!/usr/bin/env bash
# The one prepared GPU check (docs/benchmarks.md, "GPU"): a CUDA smoke run of the embedded default,
# then the benchmark tables, on digits (fp32) and on a bigger offline SD3 (bf16, full and LoRA).
#
#   OUT=/tmp/device bash scripts/device_check.sh            # on a CUDA machine, from the repo root
#   PYTHON=.venv/bin/python SMOKE_STEPS=20 LAYERS=1 HEADS=2 RES=16 BATCH=2 QUALITY_S=2 REPEATS=2 bash scripts/device_check.sh   # CPU dry run
#
# Needs the package importable (pip install -e . or PYTHONPATH=src) plus tests/ for the tiny SD3 builder.
# Writes $OUT/log.txt, smoke_summary.json, smoke_nfe_1.png, digits.json, sd35.json, sd35_lora.json.
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/fewstep_device}
WORK=${WORK:-/tmp/fewstep_device_work}
SMOKE_STEPS=${SMOKE_STEPS:-3000}
QUALITY_S=${QUALITY_S:-30}
REPEATS=${REPEATS:-30}
LAYERS=${LAYERS:-8}
HEADS=${HEADS:-16}
RES=${RES:-64}
BATCH=${BATCH:-16}
SD3=${SD3:-1}   # 0: skip the SD3 stages (smoke + digits only)
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$PWD/src:$PWD/tests:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline
exec > >(tee "$OUT/log.txt") 2>&1
status=0
stage() {  # stage NAME TIMEOUT_S CMD...: run one stage, record failure, keep going
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T))"
    local t0=$SECONDS
    timeout "$limit" "$@" || { echo "!!! $name failed (exit $?)"; status=1; }
    echo "=== $name took $((SECONDS - t0)) s"
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import torch, diffusers, hydra; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', '| diffusers', diffusers.__version__)"

# 1. CUDA smoke: the embedded default, shortened, end to end (checkpoints, grids, evaluation), then resumed.
stage smoke $((120 + SMOKE_STEPS / 25)) "$PY" -m fewstep "trainer.max_steps=$SMOKE_STEPS" trainer.checkpoint_every=$((SMOKE_STEPS / 2)) \
    trainer.sample_every=$((SMOKE_STEPS / 2)) logger.progress=false "hydra.run.dir=$WORK/smoke"
stage smoke_resume 120 "$PY" -m fewstep "trainer.max_steps=$((SMOKE_STEPS + 10))" trainer.resume=auto \
    trainer.evaluate=false trainer.baseline_steps=0 logger.progress=false "hydra.run.dir=$WORK/smoke"
cp "$WORK/smoke/summary.json" "$OUT/smoke_summary.json" 2>/dev/null
cp "$WORK/smoke/samples/nfe_1.png" "$OUT/smoke_nfe_1.png" 2>/dev/null

# 2. Digits: step time / evals / memory per objective, sampling, quality at an equal budget.
stage bench_digits 240 "$PY" -m fewstep.bench "out=$WORK/digits" "repeats=$REPEATS" "quality_budget_s=$QUALITY_S"
cp "$WORK/digits/bench.json" "$OUT/digits.json" 2>/dev/null

# 3. A bigger offline SD3 (random weights, no download): bf16, full fine-tuning and LoRA.
if [ "$SD3" = 0 ]; then
    echo "device check finished with status $status (SD3 stages skipped)"
    exit $status
fi
stage sd3_prepare 180 "$PY" tests/models/measure_memory.py --out "$WORK/sd3" --layers "$LAYERS" --heads "$HEADS" \
    --resolution "$RES" --images 64 --prepare-only
PIPE=$(ls -d "$WORK"/sd3/pipe_* 2>/dev/null | head -1)
CACHE=$(ls -d "$WORK"/sd3/cache_* 2>/dev/null | head -1)
for model in sd35 sd35_lora; do
    stage "bench_$model" 240 "$PY" -m fewstep.bench "out=$WORK/$model" "model=$model" data=latents \
        mixed_precision=bf16 "batch_size=$BATCH" "repeats=$REPEATS" sample_batch=32 \
        "overrides=[model.pretrained=$PIPE,data.path=$CACHE]"
    cp "$WORK/$model/bench.json" "$OUT/$model.json" 2>/dev/null
done
echo "device check finished with status $status"
exit $status
