# Scale: 1 CPU process x 64 images, 2 epochs.
# Offline demo, stage 3: the slim ResNet-18 with the policy the demo search
# wrote, started from the stage-1 FP teacher's weights, ranges calibrated
# before the first step, finetuned briefly on the same shipped data (the
# demo has no large dataset; the real stage 3 is finetune_r18_in1k.py).
_base_ = [
    'mmpretrain::_base_/models/resnet18_cifar.py',
    '../_base_/datasets/fashion_mnist_demo.py',
    '../_base_/default_runtime.py',
]

model = dict(
    backbone=dict(
        _delete_=True,
        type='QuantizedBackbone',
        backbone=dict(
            type='ResNet_CIFAR',
            depth=18,
            in_channels=1,
            stem_channels=16,
            base_channels=16,
            out_indices=(3, ),
            style='pytorch'),
        policy='work_dirs/demo/search/policy.json',
        # train and test with the roundings of the integer ONNX export
        # (8-bit residual points, int32 bias): the file is this network
        requant_points=True),
    head=dict(in_channels=128))
# The FP teacher of stage 1 (its keys match; the quantizer ranges are new).
load_from = 'work_dirs/demo/pretrain/epoch_3.pth'
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=4e-5))
param_scheduler = dict(type='CosineAnnealingLR', T_max=2, by_epoch=True)
train_cfg = dict(by_epoch=True, max_epochs=2, val_interval=2)
val_cfg = dict()
test_cfg = dict()
custom_hooks = [dict(type='CalibrationHook', num_batches=1, method='release')]
default_hooks = dict(logger=dict(interval=20))
randomness = dict(seed=0)
