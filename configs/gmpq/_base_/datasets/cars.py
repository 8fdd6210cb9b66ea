# StanfordCars at 224 pixels, laid out under data/Stanford_Cars
# as mmpretrain's StanfordCars expects.
_base_ = ['./fine_grained_224.py']

data_preprocessor = dict(num_classes=196)
train_dataloader = dict(
    dataset=dict(
        type='StanfordCars', data_root='data/Stanford_Cars', split='train'))
val_dataloader = dict(
    dataset=dict(
        type='StanfordCars', data_root='data/Stanford_Cars', split='test'))
test_dataloader = val_dataloader
num_classes = 196
