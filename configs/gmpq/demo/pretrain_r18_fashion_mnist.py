# Scale: 1 CPU process x 64 images, 3 epochs.
# Offline demo, stage 1: a slim CIFAR-stem ResNet-18 (16..128 channels, the
# same 19 searchable convs as the full one) trained on the shipped
# Fashion-MNIST subset. A few minutes on two CPU cores.
_base_ = [
    'mmpretrain::_base_/models/resnet18_cifar.py',
    '../_base_/datasets/fashion_mnist_demo.py',
    '../_base_/default_runtime.py',
]

model = dict(
    backbone=dict(in_channels=1, stem_channels=16, base_channels=16),
    head=dict(in_channels=128))
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=5e-4))
param_scheduler = dict(type='CosineAnnealingLR', T_max=3, by_epoch=True)
train_cfg = dict(by_epoch=True, max_epochs=3, val_interval=3)
val_cfg = dict()
test_cfg = dict()
default_hooks = dict(logger=dict(interval=20))
randomness = dict(seed=0)
