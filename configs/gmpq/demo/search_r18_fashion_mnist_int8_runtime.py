# Scale: 1 CPU process x 64 images, 2 epochs.
# The offline demo's search for an int8 runtime (onnxruntime CPU): weights
# 4 or 8 bits, activations 8 (model.target; the table in
# docs/user_guides/budgets_and_targets.md). A model-size budget picks which
# layers keep 8-bit weights: 0.50-0.53 MB (every weight at 4 bits: 0.359 MB,
# at 8 bits: 0.708 MB). Its finetuned network is the one the integer ONNX
# export reproduces (docs/user_guides/export.md, "Widths the runtime runs").
_base_ = ['./search_r18_fashion_mnist.py']

model = dict(
    target='int8_runtime', target_size_mb=0.53, target_size_mb_tolerance=0.05)
