# Food101 at 224 pixels, laid out under data/food-101 as mmpretrain's Food101 expects.
_base_ = ['./fine_grained_224.py']

data_preprocessor = dict(num_classes=101)
train_dataloader = dict(
    dataset=dict(type='Food101', data_root='data/food-101', split='train'))
val_dataloader = dict(
    dataset=dict(type='Food101', data_root='data/food-101', split='test'))
test_dataloader = val_dataloader
num_classes = 101
