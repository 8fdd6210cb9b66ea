# Scale: 1 GPU x 256 images, 25 epochs.
# Stage 2 for MobileNetV2: GMPQ search on CIFAR-10 at 128 pixels with the
# ResNet-18 search's settings (w2346a2346, bilevel, 25 epochs, lr 0.1 /
# lra 0.01, LR x0.1 every 10, aw 40, total batch 256). Needs the teacher
# from pretrain_mbv2_cifar10.py; writes policy.json into the work_dir, which
# finetune_mbv2_in1k.py reads. Worked example: docs/user_guides/new_backbone.md
_base_ = [
    './_base_/models/gmpq_search_mbv2.py',
    './_base_/datasets/cifar10_128px.py',
    './_base_/schedules/search_25e.py',
    './_base_/default_runtime.py',
]

train_dataloader = dict(batch_size=256)
auto_scale_lr = dict(base_batch_size=256)
randomness = dict(seed=0)
