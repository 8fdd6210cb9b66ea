# Scale: 1 GPU x 256 images, 25 epochs.
# Stage 2: GMPQ search of ResNet-18 (CIFAR stem) on CIFAR-10, the paper's
# settings: w2346a2346, 25 epochs, lr 0.1 / lra 0.01, LR x0.1 every 10,
# aw 40, cd 3e-4, total batch 256. Bilevel (first-order DARTS) loop; see
# search_r18_cifar10_single.py for the released code's single-level one.
# Needs the teacher from pretrain_r18_cifar10.py. Writes policy.json into
# the work_dir.
_base_ = [
    './_base_/models/gmpq_search_r18.py',
    './_base_/datasets/cifar10_bs128.py',
    './_base_/schedules/search_25e.py',
    './_base_/default_runtime.py',
]

train_dataloader = dict(batch_size=256)
auto_scale_lr = dict(base_batch_size=256)
randomness = dict(seed=0)
