#!/usr/bin/env bash
# The small_to_large policy study on one GPU, in one timed run that keeps
# what it measured when its time runs out.
#
#   bash tools/analysis/cuda_study.sh OUT_DIR [DEADLINE_S] [WORKERS]
#
# 1. each import on its own, under a timeout (say which one stalls);
# 2. the `tiny` preset in-domain on the GPU (every kind of run: teacher,
#    GMPQ / aw0 search, sensitivity, finetune), so a CUDA fault shows in a
#    minute, not after the teachers;
# 3. `small_to_large` with WORKERS processes sharing the GPU (default 12),
#    until DEADLINE_S seconds after the start (default 560).
# Every 15 s, and at the end, OUT_DIR/results.tgz is rewritten with every
# run's result.json and policy.json, the study log, report and the FP
# checkpoints (a few MB): an unfinished study resumes from them elsewhere
# (`policy_study.py small_to_large --work-dir DIR`, which skips finished
# runs), and `--report-only` writes its report.
# Needs FULL_DATA (default /usr/share/datasets/fashion-mnist): the original
# Fashion-MNIST idx files. RESUME=results.tgz (from an earlier run, which
# used the same WORK) continues that study: its finished runs are skipped,
# so a study longer than one lease runs over several.
set -uo pipefail
cd "$(dirname "$0")/../.."
. tools/analysis/cuda_env.sh
OUT_DIR=${1:?usage: cuda_study.sh OUT_DIR [DEADLINE_S] [WORKERS]}
DEADLINE=${2:-560}
WORKERS=${3:-12}
FULL_DATA=${FULL_DATA:-/usr/share/datasets/fashion-mnist}
WORK=${WORK:-/tmp/gmpq_cuda_study}
mkdir -p "$OUT_DIR" "$WORK"
if [ -n "${RESUME:-}" ]; then
    tar xzf "$RESUME" -C "$WORK" || { echo "cannot unpack $RESUME"; exit 1; }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore OMP_NUM_THREADS=1
# eager quantization kernels: a dozen processes compiling at once would
# spend the run's first minutes in the compiler
export GMPQ_QUANT_BACKEND=${GMPQ_QUANT_BACKEND:-eager}
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
say() { printf '\n==== %s (%ss)\n' "$*" "$(elapsed)"; }

pack() {  # the small files of the study, and its FP checkpoints
    (cd "$WORK" && find s2l \( -name result.json -o -name policy.json \
        -o -name 'study*' -o -path '*/runs/teacher_*/epoch_*.pth' \) \
        -type f 2>/dev/null | tar czf "$OUT_DIR/results.tgz.tmp" -T - \
        && mv "$OUT_DIR/results.tgz.tmp" "$OUT_DIR/results.tgz")
}

say "environment"
cuda_env

say "1. tiny preset, in-domain, on the GPU"
timeout 150 python3 tools/analysis/policy_study.py tiny --settings in_domain \
    --work-dir "$WORK/tiny" --workers 4 > "$OUT_DIR/tiny.log" 2>&1
rc=$?
tail -25 "$OUT_DIR/tiny.log"
[ $rc = 0 ] || { echo "tiny study failed (rc $rc)"; exit 1; }

say "2. small_to_large, $WORKERS workers, until ${DEADLINE}s"
( while sleep 15; do pack; done ) &
packer=$!
left=$(( DEADLINE - $(elapsed) ))
timeout $left python3 tools/analysis/policy_study.py small_to_large \
    --work-dir "$WORK/s2l" --workers "$WORKERS" --full-data "$FULL_DATA" \
    > "$OUT_DIR/s2l.log" 2>&1
rc=$?
kill $packer 2>/dev/null
pack
tail -40 "$OUT_DIR/s2l.log"
say "done: small_to_large rc $rc"
exit $rc
