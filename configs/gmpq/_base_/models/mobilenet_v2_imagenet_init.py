# mmpretrain's MobileNetV2 (width 1.0), started from mmpretrain's released
# ImageNet FP weights (mobilenet-v2_8xb32_in1k, 71.86 top-1 in its
# metafile). Offline, point init_cfg.checkpoint at a local copy:
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = ['mmpretrain::_base_/models/mobilenet_v2_1x.py']

imagenet_mbv2_checkpoint = (
    'https://download.openmmlab.com/mmclassification/v0/mobilenet_v2/'
    'mobilenet_v2_batch256_imagenet_20200708-3b2dc3af.pth')
model = dict(
    backbone=dict(
        init_cfg=dict(
            type='Pretrained',
            checkpoint=imagenet_mbv2_checkpoint,
            prefix='backbone')))
