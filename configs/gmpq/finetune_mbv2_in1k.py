# Scale: 8 GPUs x 32 images, 100 epochs.
# Stage 3 for MobileNetV2: finetune on ImageNet-1k with the bit policy
# searched on CIFAR-10 (configs/gmpq/search_mbv2_cifar10.py writes
# work_dirs/search_mbv2_cifar10/policy.json), from mmpretrain's FP ImageNet
# weights, ranges calibrated before the first step; the same data, schedule
# (SGD lr 0.01, wd 4e-5, cosine, 100 epochs) and calibration as
# finetune_r18_in1k.py:
#   bash tools/dist_train.sh configs/gmpq/finetune_mbv2_in1k.py 8
# A uniform baseline: --cfg-options model.backbone.policy=None \
#   model.backbone.w_bits=4 model.backbone.a_bits=4
_base_ = [
    './_base_/models/quantized_mbv2_in1k.py',
    './_base_/finetune_in1k.py',
]
