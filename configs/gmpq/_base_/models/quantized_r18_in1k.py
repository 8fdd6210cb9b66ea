# Fixed-bit ResNet-18 (ImageNet stem) for the finetune: mmpretrain's FP
# ResNet-18, initialised from its released ImageNet weights
# (./resnet18_224_imagenet_init.py: init_cfg Pretrained, prefix 'backbone'),
# wrapped by QuantizedBackbone. Every conv of the residual stages (19, the
# 1x1 downsample convs included) takes its bits from the policy the search
# wrote; the stem conv and the classifier stay FP. Policy names
# ('layer1.0.conv1', ...) are those of mmpretrain's ResNet and ResNet_CIFAR
# alike, so the CIFAR-searched policy applies as is.
# Offline: --cfg-options model.backbone.backbone.init_cfg.checkpoint=PATH
# Another policy: --cfg-options model.backbone.policy=PATH
# The released code's numerics: --cfg-options model.backbone.requant_points=False
_base_ = ['./resnet18_224_imagenet_init.py']

model = dict(
    backbone=dict(
        _delete_=True,
        type='QuantizedBackbone',
        backbone={{_base_.model.backbone}},
        # the output of configs/gmpq/search_r18_cifar10.py
        policy='work_dirs/search_r18_cifar10/policy.json',
        # train and test with the roundings of the integer ONNX export
        # (8-bit residual points, int32 bias); False: the released code's
        # finetune, whose export agrees less at 2-3-bit activations
        requant_points=True))
