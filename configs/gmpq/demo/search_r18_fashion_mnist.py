# Scale: 1 CPU process x 64 images, 2 epochs.
# Offline demo, stage 2: GMPQ search (w2346a2346, bilevel) of the slim
# ResNet-18 on the shipped Fashion-MNIST subset against the stage-1 teacher.
_base_ = [
    '../_base_/models/gmpq_search_r18.py',
    '../_base_/datasets/fashion_mnist_demo.py',
    '../_base_/schedules/search_25e.py',
    '../_base_/default_runtime.py',
]

model = dict(
    backbone=dict(
        backbone=dict(in_channels=1, stem_channels=16, base_channels=16)),
    head=dict(in_channels=128),
    teacher='{{ fileDirname }}/pretrain_r18_fashion_mnist.py',
    teacher_checkpoint='work_dirs/demo/pretrain/epoch_3.pth',
    # cd larger than CIFAR's 3e-4 so two short epochs visibly move bits.
    complexity_loss=dict(loss_weight=3e-3),
    input_shape=(1, 28, 28))
param_scheduler = dict(
    weights=[dict(type='CosineAnnealingLR', T_max=2, by_epoch=True)],
    arch=[dict(type='ConstantLR', factor=1.0, by_epoch=True)])
optim_wrapper = dict(arch=dict(optimizer=dict(lr=0.05)))
train_cfg = dict(max_epochs=2, val_interval=2)
default_hooks = dict(logger=dict(interval=20))
randomness = dict(seed=0)
