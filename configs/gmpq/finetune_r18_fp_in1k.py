# Scale: 8 GPUs x 32 images, 100 epochs.
# Full-precision baseline: plain ResNet-18 from the same FP ImageNet
# weights, same schedule and data as the quantized finetunes (the
# CalibrationHook only checks the init checkpoint: nothing to calibrate).
_base_ = [
    './_base_/models/resnet18_224_imagenet_init.py',
    './_base_/finetune_in1k.py',
]
