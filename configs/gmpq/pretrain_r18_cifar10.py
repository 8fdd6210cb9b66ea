# Scale: 1 GPU x 128 images, 200 epochs.
# Stage 1: the full-precision ResNet-18 (CIFAR stem: 3x3 conv, no max-pool)
# that the CIFAR-10 search uses as its attribution teacher.
_base_ = [
    'mmpretrain::_base_/models/resnet18_cifar.py',
    './_base_/datasets/cifar10_bs128.py',
    'mmpretrain::_base_/schedules/cifar10_bs128.py',
    './_base_/default_runtime.py',
]
