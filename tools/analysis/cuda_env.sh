# Sourced by the CUDA scripts (cuda_smoke.sh, cuda_study.sh): print the GPU
# and import the stack one module at a time, each under a timeout. One
# session's GPU run hung on an import with no output; this says which
# import stalls before anything else runs, and stops the script there.
# PYTHON (default python3) is the interpreter that holds torch.
cuda_env() {
    local py=${PYTHON:-python3} mod
    nvidia-smi -L
    for mod in numpy torch cv2 mmengine mmcv mmpretrain gmpq_mm; do
        timeout 120 "$py" -c "import time; t = time.time(); \
import $mod as m; print('import $mod', getattr(m, '__version__', ''), \
f'{time.time() - t:.1f} s')" || { echo "import $mod failed or hung"; exit 1; }
    done
    "$py" -c "import torch; print('cuda', torch.version.cuda, \
torch.cuda.get_device_name())"
}
