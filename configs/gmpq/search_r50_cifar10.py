# Scale: 1 GPU x 256 images, 25 epochs.
# Stage 2: GMPQ search of ResNet-50 (CIFAR stem, 52 searched convs) on
# CIFAR-10; cd 1e-5 as in the paper.
_base_ = ['./search_r18_cifar10.py']

model = dict(
    backbone=dict(backbone=dict(depth=50)),
    head=dict(in_channels=2048),
    teacher='{{ fileDirname }}/pretrain_r50_cifar10.py',
    teacher_checkpoint='work_dirs/pretrain_r50_cifar10/epoch_200.pth',
    complexity_loss=dict(loss_weight=1e-5))
