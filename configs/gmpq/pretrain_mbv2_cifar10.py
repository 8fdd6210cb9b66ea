# Scale: 1 GPU x 64 images, 50 epochs.
# Stage 1 for MobileNetV2: the full-precision attribution teacher of
# search_mbv2_cifar10.py, fine-tuned from ImageNet FP weights on CIFAR-10
# upsampled to 128 pixels (why 128: _base_/datasets/cifar10_128px.py), with
# the fine-tuning schedule of the 224-pixel ResNet-18 teachers (not tuned
# for this network).
_base_ = [
    './_base_/models/mobilenet_v2_imagenet_init.py',
    './_base_/datasets/cifar10_128px.py',
    './_base_/schedules/fine_grained_sgd_50e.py',
    './_base_/default_runtime.py',
]

model = dict(head=dict(num_classes=10))
# the schedule's lr 0.01 is laid out for batch 64
train_dataloader = dict(batch_size=64)
