# OxfordIIITPet at 224 pixels, laid out under data/Oxford-IIIT_Pets
# as mmpretrain's OxfordIIITPet expects.
_base_ = ['./fine_grained_224.py']

data_preprocessor = dict(num_classes=37)
train_dataloader = dict(
    dataset=dict(
        type='OxfordIIITPet',
        data_root='data/Oxford-IIIT_Pets',
        split='trainval'))
val_dataloader = dict(
    dataset=dict(
        type='OxfordIIITPet', data_root='data/Oxford-IIIT_Pets', split='test'))
test_dataloader = val_dataloader
num_classes = 37
