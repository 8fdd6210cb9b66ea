# mmpretrain's CIFAR-10 settings, read through CIFAR10Format: identical on the
# official files, and tolerant of CIFAR-format files that differ from them.
_base_ = ['mmpretrain::_base_/datasets/cifar10_bs16.py']

train_dataloader = dict(
    batch_size=128,
    dataset=dict(type='CIFAR10Format', data_root='data/cifar10'))
val_dataloader = dict(
    batch_size=128,
    dataset=dict(type='CIFAR10Format', data_root='data/cifar10'))
test_dataloader = val_dataloader
