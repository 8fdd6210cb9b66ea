# Scale: 8 GPUs x 32 images, 100 epochs.
# Stage 3 for ResNet-50 (52 quantized convs): the policy of
# configs/gmpq/search_r50_cifar10.py, mmpretrain's FP ImageNet ResNet-50.
_base_ = ['./finetune_r18_in1k.py']

imagenet_r50_checkpoint = (
    'https://download.openmmlab.com/mmclassification/v0/resnet/'
    'resnet50_8xb32_in1k_20210831-ea4938fc.pth')
model = dict(
    backbone=dict(
        backbone=dict(
            depth=50, init_cfg=dict(checkpoint=imagenet_r50_checkpoint)),
        policy='work_dirs/search_r50_cifar10/policy.json'),
    head=dict(in_channels=2048))
