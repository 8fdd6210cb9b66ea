# CIFAR-10 upsampled to 128x128 for networks with a stride-32 ImageNet
# stem (MobileNetV2): at 32x32 their last feature map is 1x1, so the
# attribution map has one pixel and the attribution loss is void; at 128
# it is 4x4, as the CIFAR ResNet-18's last stage is at 32. ImageNet
# mean / std, since the teacher starts from ImageNet weights. Read through
# CIFAR10Format, like cifar10_bs128.py.
_base_ = ['./cifar10_bs128.py']

data_preprocessor = dict(
    num_classes=10,
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    # CIFAR images are loaded as RGB already
    to_rgb=False)

train_pipeline = [
    dict(type='RandomCrop', crop_size=32, padding=4),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='Resize', scale=(128, 128)),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='Resize', scale=(128, 128)),
    dict(type='PackInputs'),
]

train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
