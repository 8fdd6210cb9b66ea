# Scale: 1 GPU x 64 images, 50 epochs.
# Stage 1: full-precision ResNet-18 teacher for the food101 search, fine-tuned
# from ImageNet FP weights at 224 pixels.
_base_ = [
    './_base_/models/resnet18_224_imagenet_init.py',
    './_base_/datasets/food101.py',
    './_base_/schedules/fine_grained_sgd_50e.py',
    './_base_/default_runtime.py',
]

model = dict(head=dict(num_classes={{_base_.num_classes}}))
