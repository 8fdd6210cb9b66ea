#!/usr/bin/env bash
# The whole GMPQ pipeline, offline, on the Fashion-MNIST subset shipped in
# data_demo/ (CPU, a few minutes):
#   1. pretrain the FP teacher and print its test accuracy,
#   2. search a bit policy against it and print the policy table,
#   3. finetune the mixed-precision network with that policy, test it
#      (accuracy with BitOPs) and export it as a packed low-bit artifact.
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

say "1/3 pretrain the FP teacher"
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

say "2/3 GMPQ search (bilevel, w2346a2346)"
python tools/train.py $CFG/search_r18_fashion_mnist.py \
    --work-dir "$WORK/search" --no-validate \
    --cfg-options model.teacher_checkpoint="$TEACHER" \
    > "$WORK/search.log" 2>&1 || { tail -40 "$WORK/search.log"; exit 1; }
python tools/analysis/complexity.py $CFG/pretrain_r18_fashion_mnist.py \
    --policy "$WORK/search/policy.json"

say "3/3 finetune with the policy, test, export"
python tools/train.py $CFG/finetune_r18_fashion_mnist.py \
    --work-dir "$WORK/finetune" --no-validate \
    --cfg-options model.backbone.policy="$WORK/search/policy.json" \
    load_from="$TEACHER" \
    > "$WORK/finetune.log" 2>&1 || { tail -40 "$WORK/finetune.log"; exit 1; }
MIXED="$WORK/finetune/epoch_2.pth"
python tools/test.py $CFG/finetune_r18_fashion_mnist.py "$MIXED" \
    --work-dir "$WORK/finetune_test" --out "$WORK/mixed_result.json" \
    --cfg-options model.backbone.policy="$WORK/search/policy.json" \
    > "$WORK/mixed_test.log" 2>&1 || { tail -40 "$WORK/mixed_test.log"; exit 1; }
python tools/deploy/export.py $CFG/finetune_r18_fashion_mnist.py "$MIXED" \
    --out "$WORK/mixed.safetensors" --json "$WORK/export.json" \
    --cfg-options model.backbone.policy="$WORK/search/policy.json" \
    > "$WORK/export.log" 2>&1 || { tail -40 "$WORK/export.log"; exit 1; }
python - "$WORK" <<'PY'
import json, os, sys
work = sys.argv[1]
r = json.load(open(os.path.join(work, 'mixed_result.json')))
c = r['complexity']
print(f"mixed-precision top-1: {r['metrics']['accuracy/top1']:.2f}%  "
      f"BitOPs {c['bitops_quantized']:.4f} G (searched layers), "
      f"{c['bitops_total']:.4f} G (whole net), size {c['size_mb']:.3f} MB, "
      f"compression {c['compression']:.1f}x")
size = os.path.getsize(os.path.join(work, 'mixed.safetensors')) / 1e6
print(f"artifact {work}/mixed.safetensors: {size:.3f} MB")
PY

say "done; policy: $WORK/search/policy.json, logs: $WORK/*.log"
