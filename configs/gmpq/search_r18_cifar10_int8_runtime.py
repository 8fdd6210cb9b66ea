# Scale: 1 GPU x 256 images, 25 epochs.
# Search for an int8 runtime (onnxruntime CPU, TensorRT INT8): the target
# preset replaces the candidates by what such runtimes store and execute
# natively -- activations 8 bits, weights 4 or 8 bits (the table in
# docs/user_guides/budgets_and_targets.md) -- and the policy records it, so
# that the export names any layer the target would only emulate. The size
# budget picks which layers keep 8-bit weights: 7.6-8.0 MB (all 4-bit
# weights: 5.64 MB, all 8-bit: 11.22 MB).
_base_ = ['./search_r18_cifar10.py']

model = dict(
    target='int8_runtime', target_size_mb=8.0, target_size_mb_tolerance=0.05)
