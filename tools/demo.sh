#!/usr/bin/env bash
# The whole GMPQ pipeline, offline, on the Fashion-MNIST subset shipped in
# data_demo/ (CPU, a few minutes):
#   1. pretrain the FP teacher and print its test accuracy,
#   2. search a bit policy against it and print the policy table,
#   3. finetune the mixed-precision network with that policy, test it
#      (accuracy with BitOPs), export it as a packed low-bit artifact and
#      as an integer ONNX file, and test that file against PyTorch,
#   4. finetune uniform W2A2 / W4A4 baselines the same way, then draw the
#      pictures: accuracy vs BitOPs (with a markdown table), the policy,
#      the search curves, and teacher vs mixed attribution maps.
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

say "1/4 pretrain the FP teacher"
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

say "2/4 GMPQ search (bilevel, w2346a2346)"
python tools/train.py $CFG/search_r18_fashion_mnist.py \
    --work-dir "$WORK/search" --no-validate \
    --cfg-options model.teacher_checkpoint="$TEACHER" \
    > "$WORK/search.log" 2>&1 || { tail -40 "$WORK/search.log"; exit 1; }
python tools/analysis/complexity.py $CFG/pretrain_r18_fashion_mnist.py \
    --policy "$WORK/search/policy.json"

say "3/4 finetune with the policy, test, export"
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
if python -c "import onnx, onnxruntime" 2> /dev/null; then
    # the integer ONNX file onnxruntime runs, and its agreement with PyTorch
    python tools/deploy/export.py $CFG/finetune_r18_fashion_mnist.py \
        "$MIXED" --out "$WORK/mixed.onnx" \
        --cfg-options model.backbone.policy="$WORK/search/policy.json" \
        > "$WORK/export_onnx.log" 2>&1 \
        || { tail -40 "$WORK/export_onnx.log"; exit 1; }
    python tools/deploy/test_onnx.py $CFG/finetune_r18_fashion_mnist.py \
        "$WORK/mixed.onnx" --checkpoint "$MIXED" \
        --cfg-options model.backbone.policy="$WORK/search/policy.json" \
        > "$WORK/test_onnx.log" 2>&1 \
        || { tail -40 "$WORK/test_onnx.log"; exit 1; }
    tail -1 "$WORK/test_onnx.log"
else
    echo "onnx / onnxruntime not installed: integer ONNX export skipped" \
        "(pip install onnx onnxruntime)"
fi
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

say "4/4 uniform baselines (W2A2, W4A4) and the pictures"
FT=$CFG/finetune_r18_fashion_mnist.py
for bits in 2 4; do
    python tools/train.py $FT --work-dir "$WORK/finetune_w${bits}a${bits}" \
        --no-validate --cfg-options model.backbone.policy=None \
        model.backbone.w_bits=$bits model.backbone.a_bits=$bits \
        load_from="$TEACHER" > "$WORK/finetune_w${bits}a${bits}.log" 2>&1 \
        || { tail -40 "$WORK/finetune_w${bits}a${bits}.log"; exit 1; }
    python tools/test.py $FT "$WORK/finetune_w${bits}a${bits}/epoch_2.pth" \
        --work-dir "$WORK/finetune_w${bits}a${bits}_test" \
        --out "$WORK/w${bits}a${bits}_result.json" --cfg-options \
        model.backbone.policy=None model.backbone.w_bits=$bits \
        model.backbone.a_bits=$bits > "$WORK/w${bits}a${bits}_test.log" 2>&1 \
        || { tail -40 "$WORK/w${bits}a${bits}_test.log"; exit 1; }
done
PICS="$WORK/pictures"
mkdir -p "$PICS"
python tools/analysis/pareto.py "$WORK/teacher_result.json" \
    "$WORK/mixed_result.json" "$WORK/w2a2_result.json" \
    "$WORK/w4a4_result.json" --names FP32-teacher GMPQ-mixed W2A2 W4A4 \
    --out-md "$PICS/pareto.md" --out-png "$PICS/pareto.png"
python tools/visualization/plot_policy.py "$WORK/search/policy.json" \
    --out "$PICS/policy.png"
python tools/visualization/plot_search_curves.py "$WORK/search" \
    --out "$PICS/search_curves.png"
python tools/dataset_converters/idx_to_png.py \
    data_demo/fashion_mnist_subset/t10k-images-idx3-ubyte \
    data_demo/fashion_mnist_subset/t10k-labels-idx1-ubyte \
    --out "$WORK/images" --num 4 > /dev/null
python tools/visualization/vis_attribution.py $FT "$MIXED" \
    --images "$WORK"/images/*.png \
    --teacher-config $CFG/pretrain_r18_fashion_mnist.py \
    --teacher-checkpoint "$TEACHER" --out "$PICS/attribution.png" \
    --cfg-options model.backbone.policy="$WORK/search/policy.json"

say "done; policy: $WORK/search/policy.json, pictures: $PICS, logs: $WORK/*.log"
