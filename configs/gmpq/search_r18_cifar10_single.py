# Scale: 1 GPU x 256 images, 25 epochs.
# The released code's single-level search: one batch, one backward, both
# optimizers step (everything else as search_r18_cifar10.py).
_base_ = ['./search_r18_cifar10.py']

train_cfg = dict(mode='single')
