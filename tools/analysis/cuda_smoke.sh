#!/usr/bin/env bash
# The CUDA checks a CPU machine cannot make, in one short run (about 5 min on
# one H100): the offline demo end to end on the GPU, the search with --amp
# (bilevel and single-level), the search through tools/dist_train.sh (NCCL),
# and training throughput of FP / W4A4 / search steps (fp32, AMP, and AMP
# with the compiled quantizers).
# Usage: bash tools/analysis/cuda_smoke.sh [OUT_DIR]   (default
# work_dirs/cuda_smoke); prints a log and writes JSON figures to OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/../.."
. tools/analysis/cuda_env.sh
OUT_DIR=${1:-work_dirs/cuda_smoke}
WORK=${WORK:-/tmp/gmpq_cuda_smoke}
mkdir -p "$OUT_DIR" "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
start=$(date +%s)
say() { printf '\n==== %s (%ss)\n' "$*" "$(( $(date +%s) - start ))"; }
status=0
check() { local rc=$1; shift; echo "---- $* -> rc $rc"; [ "$rc" = 0 ] || status=1; }

say "environment"
PYTHON=python cuda_env

say "1. offline demo on the GPU (pretrain, search, finetune, test, export)"
timeout 240 bash tools/demo.sh "$WORK/demo"
check $? demo
cp "$WORK/demo/search/policy.json" "$OUT_DIR/demo_policy.json" 2>/dev/null
TEACHER="$WORK/demo/pretrain/epoch_3.pth"
SEARCH=configs/gmpq/demo/search_r18_fashion_mnist.py

for mode in bilevel single; do
    say "2. search --amp, $mode, 1 epoch"
    timeout 90 python tools/train.py $SEARCH --amp --no-validate \
        --work-dir "$WORK/amp_$mode" --cfg-options \
        model.teacher_checkpoint="$TEACHER" train_cfg.max_epochs=1 \
        train_cfg.mode=$mode > "$WORK/amp_$mode.log" 2>&1
    check $? "search --amp $mode"
    grep -E "AmpOptimWrapper|Epoch\(train\).*\[1\]|policy written|Error" \
        "$WORK/amp_$mode.log" | tail -4
    tail -3 "$WORK/amp_$mode.log"
done

say "3. search through dist_train.sh (1 GPU, NCCL, --amp)"
PORT=29533 timeout 120 bash tools/dist_train.sh $SEARCH 1 --amp \
    --no-validate --work-dir "$WORK/dist" --cfg-options \
    model.teacher_checkpoint="$TEACHER" train_cfg.max_epochs=1 \
    > "$WORK/dist.log" 2>&1
check $? "dist_train.sh search"
grep -E "Distributed launcher|backend|nccl|NCCL|world_size|policy written" \
    "$WORK/dist.log" | head -6
tail -3 "$WORK/dist.log"

say "4. throughput (ResNet-18 224 px, batch 128)"
timeout 100 python tools/analysis/benchmark_cuda.py --batch-size 128 \
    --backend eager --json "$OUT_DIR/bench_fp32.json"
check $? "benchmark fp32"
timeout 100 python tools/analysis/benchmark_cuda.py --batch-size 128 --amp \
    --backend eager --json "$OUT_DIR/bench_amp.json"
check $? "benchmark amp"
timeout 200 python \
    tools/analysis/benchmark_cuda.py --batch-size 128 --amp --backend compile \
    --json "$OUT_DIR/bench_amp_compile.json"
check $? "benchmark amp compile"

say "done, status $status"
exit $status
