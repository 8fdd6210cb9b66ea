# Scale: 1 GPU x 128 images, 200 epochs.
# Stage 1: the full-precision ResNet-50 (CIFAR stem) teacher for CIFAR-10.
_base_ = [
    'mmpretrain::_base_/models/resnet50_cifar.py',
    './_base_/datasets/cifar10_bs128.py',
    'mmpretrain::_base_/schedules/cifar10_bs128.py',
    './_base_/default_runtime.py',
]
