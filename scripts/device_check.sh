#!/usr/bin/env bash
# The one prepared GPU check (docs/benchmarks.md, "GPU"): a CUDA smoke run of the embedded default,
# the benchmark tables on digits (fp32) and on a bigger offline SD3 (bf16, full and LoRA), the real-size
# table (random-weight SD3.5-medium, SANA-1.6B, Qwen-Image-20B at 1024², no download) and torch.compile.
#
#   OUT=/tmp/device bash scripts/device_check.sh            # on a CUDA machine, from the repo root
#   STAGES="digits sd3 realsize compile" ...                # a subset (default: all five, smoke first)
#   STAGES=fsdp ...                                         # DDP vs FSDP memory of full Qwen-Image (2+ GPUs)
#   PYTHON=.venv/bin/python SMOKE_STEPS=20 LAYERS=1 HEADS=2 RES=16 BATCH=2 QUALITY_S=2 REPEATS=2 RUNS=1 SD3_RUNS=1 \
#       REAL_LAYERS=1 REAL_RES=64 REAL_REPEATS=1 bash scripts/device_check.sh   # CPU dry run (reduced depth/size)
#
# Needs the package importable (pip install -e . or PYTHONPATH=src) plus tests/ for the tiny SD3 builder.
# Writes $OUT/log.txt, smoke_summary.json, smoke_nfe_1.png, digits.json, sd35.json, sd35_lora.json,
# realsize.json (+ realsize.md) and compile.json.
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/fewstep_device}
WORK=${WORK:-/tmp/fewstep_device_work}
SMOKE_STEPS=${SMOKE_STEPS:-3000}
QUALITY_S=${QUALITY_S:-30}
REPEATS=${REPEATS:-30}
RUNS=${RUNS:-3}         # timing runs per bench (the step-ratio spread over runs); SD3 benches: SD3_RUNS
SD3_RUNS=${SD3_RUNS:-2}
LAYERS=${LAYERS:-8}
HEADS=${HEADS:-16}
RES=${RES:-64}
BATCH=${BATCH:-16}
STAGES=${STAGES:-smoke digits sd3 realsize compile}
REAL_LAYERS=${REAL_LAYERS:-}   # empty: the published depth
REAL_RES=${REAL_RES:-1024}
REAL_REPEATS=${REAL_REPEATS:-5}   # + 1 warm-up = 6 steps: one whole DMD2 cycle (5 critic steps, 1 generator step)
REAL_STAGE_S=${REAL_STAGE_S:-300}   # limit of each real-size stage
FSDP_LAYERS=${FSDP_LAYERS:-4}   # stage fsdp: Qwen-Image blocks (of 60; 4 ≈ 1.4B params)
FSDP_STEPS=${FSDP_STEPS:-5}
FSDP_STAGE_S=${FSDP_STAGE_S:-420}
REAL_BATCH=${REAL_BATCH:-1}   # 1: the real-size issue's goal rows (the H100 table of docs/realsize.md has batch 4:
                              # one row in each TwinFlow group e2e/mul/any/adv; at 1 the row is a 'mul' row)
want() { case " $STAGES " in *" $1 "*) return 0 ;; esac; return 1; }
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
if want smoke; then
    stage smoke $((120 + SMOKE_STEPS / 25)) "$PY" -m fewstep "trainer.max_steps=$SMOKE_STEPS" \
        trainer.checkpoint_every=$((SMOKE_STEPS / 2)) trainer.sample_every=$((SMOKE_STEPS / 2)) logger.progress=false \
        "hydra.run.dir=$WORK/smoke"
    stage smoke_resume 120 "$PY" -m fewstep "trainer.max_steps=$((SMOKE_STEPS + 10))" trainer.resume=auto \
        trainer.evaluate=false trainer.baseline_steps=0 logger.progress=false "hydra.run.dir=$WORK/smoke"
    cp "$WORK/smoke/summary.json" "$OUT/smoke_summary.json" 2>/dev/null
    cp "$WORK/smoke/samples/nfe_1.png" "$OUT/smoke_nfe_1.png" 2>/dev/null
fi

# 2. Digits: step time / evals / memory per objective (each variant's memory alone in a fresh process),
#    sampling, quality at an equal budget (QUALITY_S=0 skips it).
if want digits; then
    stage bench_digits 240 "$PY" -m fewstep.bench "out=$WORK/digits" "repeats=$REPEATS" "runs=$RUNS" \
        "quality_budget_s=$QUALITY_S"
    cp "$WORK/digits/bench.json" "$OUT/digits.json" 2>/dev/null
fi

# 3. A bigger offline SD3 (random weights, no download): bf16, full fine-tuning and LoRA.
if want sd3; then
    stage sd3_prepare 180 "$PY" tests/helpers/measure_memory.py --out "$WORK/sd3" --layers "$LAYERS" --heads "$HEADS" \
        --resolution "$RES" --images 64 --prepare-only
    PIPE=$(ls -d "$WORK"/sd3/pipe_* 2>/dev/null | head -1)
    CACHE=$(ls -d "$WORK"/sd3/cache_* 2>/dev/null | head -1)
    for model in sd35 sd35_lora; do
        stage "bench_$model" 240 "$PY" -m fewstep.bench "out=$WORK/$model" "model=$model" data=latents \
            mixed_precision=bf16 "batch_size=$BATCH" "repeats=$REPEATS" "runs=$SD3_RUNS" sample_batch=32 objectives_only=true \
            "overrides=[model.pretrained=$PIPE,data.path=$CACHE]"
        cp "$WORK/$model/bench.json" "$OUT/$model.json" 2>/dev/null
    done
fi

# 4. Real size without weights (SPEC §12): each family's published architecture, random bf16 weights,
#    1024², batch $REAL_BATCH, gradient checkpointing; every (model, objective) alone in a fresh process, OOM a result.
if want realsize; then
    layers=${REAL_LAYERS:+,model.num_layers=$REAL_LAYERS}
    real() {  # real NAME MODEL ARCHITECTURE VARIANTS
        stage "real_$1" "$REAL_STAGE_S" "$PY" -m fewstep.bench "out=$WORK/real_$1" "model=$2" data=synthetic mixed_precision=bf16 \
            "batch_size=$REAL_BATCH" isolate=true warmup=1 "repeats=$REAL_REPEATS" objectives_only=true "variants=$4" \
            "overrides=[model.random_init=true,model.architecture=$3,model.dtype=bfloat16,model.gradient_checkpointing=true,data.resolution=$REAL_RES$layers]"
    }
    real sd35_medium_lora sd35_lora sd35_medium "[flow_matching,twinflow,twinflow_no_enhance,dmd2]"
    real sana_full sana sana_1600m_1024px "[flow_matching,twinflow,dmd2]"
    real qwenimage_lora qwenimage_lora qwen_image "[flow_matching,twinflow,dmd2]"
    "$PY" -c "import sys; from fewstep.bench.tables import collect; collect(sys.argv[1], sys.argv[2:])" "$OUT/realsize" \
        "$WORK"/real_* || status=1
    # the shipped estimates (docs/raw/estimate_realsize, fewstep.bench.estimate) against these measurements, row by row
    "$PY" scripts/estimate_vs_measured.py "$OUT/realsize.json" docs/raw/estimate_realsize/*/ \
        | tee "$OUT/estimate_vs_measured.md" || status=1
fi

# 5. trainer.compile: eager vs torch.compile'd model, digits (fp32), same process, interleaved.
if want compile; then
    stage compile_digits 240 "$PY" -m fewstep.bench "out=$WORK/compile" "repeats=$REPEATS" runs=1 objectives_only=true \
        compare_compile=true "variants=[flow_matching,twinflow_no_enhance]"
    cp "$WORK/compile/bench.json" "$OUT/compile.json" 2>/dev/null
fi
# 6. trainer.distributed=ddp vs fsdp (2+ GPUs; not in the default STAGES: STAGES=fsdp): per-GPU peak memory and step
#    rate of the full Qwen-Image fine-tune of the qwenimage_full row (random weights, $FSDP_LAYERS of its 60 blocks,
#    fp32 master weights, bf16 compute, gradient checkpointing, EMA 0) over every GPU. Writes fsdp_ddp.json and
#    fsdp_fsdp.json (summary.json: peak_memory_mb is rank 0's, params_per_process each rank's share).
if want fsdp; then
    ngpu=${FSDP_PROCESSES:-$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)}
    if [ "${ngpu:-0}" -lt 2 ]; then
        echo "=== fsdp skipped: $ngpu GPU(s), sharding needs 2 or more (FSDP_PROCESSES=2 on CPU: a gloo dry run)"
    else
        for mode in ddp fsdp; do
            stage "fsdp_$mode" "$FSDP_STAGE_S" "$PY" -m accelerate.commands.launch --multi_gpu --num_processes "$ngpu" \
                --num_machines 1 --mixed_precision bf16 --dynamo_backend no -m fewstep objective=twinflow sampler=ucgm \
                teacher.decay=0 model=qwenimage model.random_init=true model.architecture=qwen_image \
                "model.num_layers=$FSDP_LAYERS" model.dtype=float32 model.gradient_checkpointing=true data=synthetic \
                data.architecture=qwen_image "data.resolution=$REAL_RES" data.batch_size=1 trainer.mixed_precision=bf16 \
                "trainer.distributed=$mode" "trainer.max_steps=$FSDP_STEPS" trainer.log_every=1 \
                trainer.checkpoint_every=1000000 trainer.sample_every=1000000 trainer.evaluate=false \
                trainer.baseline_steps=0 "trainer.final_nfe=[1]" trainer.grid_size=1 logger=none logger.progress=false \
                "hydra.run.dir=$WORK/fsdp_$mode"
            cp "$WORK/fsdp_$mode/summary.json" "$OUT/fsdp_$mode.json" 2>/dev/null
            rm -rf "$WORK/fsdp_$mode/checkpoints"  # gigabytes; the summary holds the numbers
        done
    fi
fi
echo "device check finished with status $status"
exit $status
