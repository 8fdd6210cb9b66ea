# Scale: 1 GPU x 64 images, 25 epochs.
# Stage 2: GMPQ search of ResNet-18 (ImageNet stem) on cars at 224 pixels
# (the released code crashes here: its pooling assumed 32x32). Teacher:
# pretrain_r18_cars.py.
_base_ = [
    './_base_/models/gmpq_search_r18.py',
    './_base_/datasets/cars.py',
    './_base_/schedules/search_25e.py',
    './_base_/default_runtime.py',
]

model = dict(
    backbone=dict(backbone=dict(type='ResNet')),
    head=dict(num_classes={{_base_.num_classes}}),
    teacher='{{ fileDirname }}/pretrain_r18_cars.py',
    teacher_checkpoint='work_dirs/pretrain_r18_cars/epoch_50.pth',
    input_shape=(3, 224, 224))
randomness = dict(seed=0)
