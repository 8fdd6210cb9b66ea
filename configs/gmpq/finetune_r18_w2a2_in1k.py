# Scale: 8 GPUs x 32 images, 100 epochs.
# Uniform-precision baseline: every quantized conv of ResNet-18 at
# W2A2 (stem and classifier FP), same finetune as the mixed policy.
_base_ = ['./finetune_r18_in1k.py']

model = dict(backbone=dict(policy=None, w_bits=2, a_bits=2))
