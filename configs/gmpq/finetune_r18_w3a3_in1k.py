# Scale: 8 GPUs x 32 images, 100 epochs.
# Uniform-precision baseline: every quantized conv of ResNet-18 at
# W3A3 (stem and classifier FP), same finetune as the mixed policy.
_base_ = ['./finetune_r18_in1k.py']

model = dict(backbone=dict(policy=None, w_bits=3, a_bits=3))
