# GMPQ supernet (w2346a2346 over the 19 convs of the residual stages; stem
# and classifier FP) with its frozen FP teacher and the two search losses.
model = dict(
    type='GMPQSearchClassifier',
    backbone=dict(
        type='MixedPrecisionBackbone',
        backbone=dict(
            type='ResNet_CIFAR',
            depth=18,
            num_stages=4,
            out_indices=(3, ),
            style='pytorch'),
        w_bits=[2, 3, 4, 6],
        a_bits=[2, 3, 4, 6]),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=10,
        in_channels=512,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0)),
    teacher='{{ fileDirname }}/../../pretrain_r18_cifar10.py',
    teacher_checkpoint='work_dirs/pretrain_r18_cifar10/epoch_200.pth',
    # --aw 40 (pnorm=3: the released code's normalised p-power L2)
    attribution_loss=dict(
        type='AttributionRankLoss', mode='pnorm', pnorm=3.0, loss_weight=40.0),
    # --cd 3e-4, normalised by the first searched conv's MACs
    complexity_loss=dict(type='ComplexityLoss', loss_weight=3e-4),
    input_shape=(3, 32, 32))
