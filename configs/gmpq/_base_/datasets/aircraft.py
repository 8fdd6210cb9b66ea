# FGVCAircraft at 224 pixels, laid out under data/fgvc-aircraft-2013b
# as mmpretrain's FGVCAircraft expects.
_base_ = ['./fine_grained_224.py']

data_preprocessor = dict(num_classes=100)
train_dataloader = dict(
    dataset=dict(
        type='FGVCAircraft',
        data_root='data/fgvc-aircraft-2013b',
        split='trainval'))
val_dataloader = dict(
    dataset=dict(
        type='FGVCAircraft',
        data_root='data/fgvc-aircraft-2013b',
        split='test'))
test_dataloader = val_dataloader
num_classes = 100
