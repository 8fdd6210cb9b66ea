# Fixed-bit MobileNetV2 for the ImageNet finetune: mmpretrain's FP
# MobileNetV2 initialised from its released ImageNet weights
# (./mobilenet_v2_imagenet_init.py), wrapped by QuantizedBackbone. Its 51
# convs (all but the stem) take their bits from the policy the search
# wrote; the stem conv and the classifier stay FP. The policy searched at
# 128 pixels on CIFAR-10 names the same modules, so it applies as is.
# Offline: --cfg-options model.backbone.backbone.init_cfg.checkpoint=PATH
# Another policy: --cfg-options model.backbone.policy=PATH
_base_ = ['./mobilenet_v2_imagenet_init.py']

model = dict(
    backbone=dict(
        _delete_=True,
        type='QuantizedBackbone',
        backbone={{_base_.model.backbone}},
        # the output of configs/gmpq/search_mbv2_cifar10.py
        policy='work_dirs/search_mbv2_cifar10/policy.json',
        # train and test with the roundings of the integer ONNX export
        # (8-bit residual points, int32 bias); False: the released code's
        requant_points=True))
