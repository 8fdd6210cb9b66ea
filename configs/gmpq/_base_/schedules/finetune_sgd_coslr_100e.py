# The released finetune schedule (main.py --epochs 100 --lr 0.01 --wd 4e-5,
# cosine annealing per epoch): mmpretrain's 100-epoch cosine ImageNet
# schedule (SGD momentum 0.9, CosineAnnealingLR by epoch, validation every
# epoch) with the finetune's learning rate and weight decay.
_base_ = ['mmpretrain::_base_/schedules/imagenet_bs256_coslr.py']

optim_wrapper = dict(optimizer=dict(lr=0.01, weight_decay=4e-5))
