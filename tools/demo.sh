#!/usr/bin/env bash
# The whole GMPQ pipeline, offline, on the Fashion-MNIST subset shipped in
# data_demo/ (CPU, a few minutes):
#   1. pretrain the FP teacher and print its test accuracy,
#   2. search a bit policy against it and print the policy table.
# Usage: bash tools/demo.sh [WORK_DIR]   (default work_dirs/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-work_dirs/demo}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
CFG=configs/gmpq/demo
mkdir -p "$WORK"
start=$(date +%s)
say() { printf '\n==== %s (%ss)\n' "$*" "$(( $(date +%s) - start ))"; }

say "1/2 pretrain the FP teacher"
python tools/train.py $CFG/pretrain_r18_fashion_mnist.py \
    --work-dir "$WORK/pretrain" --no-validate > "$WORK/pretrain.log" 2>&1 \
    || { tail -40 "$WORK/pretrain.log"; exit 1; }
TEACHER="$WORK/pretrain/epoch_3.pth"
python tools/test.py $CFG/pretrain_r18_fashion_mnist.py "$TEACHER" \
    --work-dir "$WORK/pretrain_test" --out "$WORK/teacher_result.json" \
    > "$WORK/teacher_test.log" 2>&1 || { tail -40 "$WORK/teacher_test.log"; exit 1; }
python - "$WORK/teacher_result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"teacher top-1 on the 1,000 test images: "
      f"{r['metrics']['accuracy/top1']:.2f}%")
PY

say "2/2 GMPQ search (bilevel, w2346a2346)"
python tools/train.py $CFG/search_r18_fashion_mnist.py \
    --work-dir "$WORK/search" --no-validate \
    --cfg-options model.teacher_checkpoint="$TEACHER" \
    > "$WORK/search.log" 2>&1 || { tail -40 "$WORK/search.log"; exit 1; }
python tools/analysis/complexity.py $CFG/pretrain_r18_fashion_mnist.py \
    --policy "$WORK/search/policy.json"

say "done; policy: $WORK/search/policy.json, logs: $WORK/*.log"
