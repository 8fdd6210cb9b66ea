# Scale: 8 GPUs x 32 images, 100 epochs.
# Stage 3: finetune ResNet-18 on ImageNet-1k with the bit policy searched on
# CIFAR-10 (configs/gmpq/search_r18_cifar10.py writes
# work_dirs/search_r18_cifar10/policy.json), starting from mmpretrain's FP
# ImageNet weights, ranges calibrated before the first step:
#   bash tools/dist_train.sh configs/gmpq/finetune_r18_in1k.py 8
#   python tools/test.py configs/gmpq/finetune_r18_in1k.py CKPT --out r.json
#     (top-1 / top-5 with the policy's BitOPs, size and compression)
#   python tools/deploy/export.py configs/gmpq/finetune_r18_in1k.py CKPT \
#     --out r18_gmpq.safetensors   (packed low-bit artifact)
_base_ = [
    './_base_/models/quantized_r18_in1k.py',
    './_base_/finetune_in1k.py',
]
