# ImageNet-style 224-pixel pipelines (mmpretrain's) shared by the five
# fine-grained search sets; each dataset file below sets type and paths.
_base_ = ['mmpretrain::_base_/datasets/imagenet_bs32.py']

train_dataloader = dict(batch_size=64, num_workers=4)
val_dataloader = dict(batch_size=64, num_workers=4)
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, 5))
test_evaluator = val_evaluator
