# mmpretrain's ResNet-18 (ImageNet stem), started from mmpretrain's released
# ImageNet FP weights. Offline, point init_cfg.checkpoint at a local copy:
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = ['mmpretrain::_base_/models/resnet18.py']

imagenet_r18_checkpoint = (
    'https://download.openmmlab.com/mmclassification/v0/resnet/'
    'resnet18_8xb32_in1k_20210831-fbbb1da6.pth')
model = dict(
    backbone=dict(
        init_cfg=dict(
            type='Pretrained',
            checkpoint=imagenet_r18_checkpoint,
            prefix='backbone')),
    head=dict(topk=(1, 5)))
