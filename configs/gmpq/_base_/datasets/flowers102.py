# Flowers102 at 224 pixels, laid out under data/Flowers102 as mmpretrain's Flowers102 expects.
_base_ = ['./fine_grained_224.py']

data_preprocessor = dict(num_classes=102)
train_dataloader = dict(
    dataset=dict(
        type='Flowers102', data_root='data/Flowers102', split='trainval'))
val_dataloader = dict(
    dataset=dict(type='Flowers102', data_root='data/Flowers102', split='test'))
test_dataloader = val_dataloader
num_classes = 102
