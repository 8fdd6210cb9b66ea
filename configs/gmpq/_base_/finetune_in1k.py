# What every ImageNet finetune (stage 3) shares: mmpretrain's ImageNet
# dataset and standard pipelines (train: RandomResizedCrop 224 + flip; val /
# test: ResizeEdge 256 + CenterCrop 224), the released finetune schedule
# (SGD lr 0.01, momentum 0.9, wd 4e-5, cosine by epoch, 100 epochs) and the
# calibration of the quantizer ranges before the first step.
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs32.py',
    './schedules/finetune_sgd_coslr_100e.py',
    './default_runtime.py',
]

# Batch laid out for 8 GPUs: 8 x 32 = 256 images per step
# (bash tools/dist_train.sh CONFIG 8), lr 0.01 for that total batch. The
# release ran 3 GPUs x 192 = 576 images at the same lr 0.01. With
# --auto-scale-lr the lr is scaled linearly from base_batch_size to the
# actual total batch (number of GPUs x train_dataloader.batch_size).
train_dataloader = dict(batch_size=32)
auto_scale_lr = dict(base_batch_size=256)

# Activation ranges and weight thresholds from the FP network on one
# training batch per GPU (statistics summed over GPUs), as the release did
# before training: r = min(6, max|x|, threshold) and T = threshold for
# b < 5, max otherwise, the threshold computed as the release computes its
# "KL threshold" (method='release'; 'kl' = TensorRT's entropy calibration,
# which collapses at 2-3 bits; 'mse'; 'max'). Skipped on resume. The FP
# checkpoint of the backbone's init_cfg is checked against the network
# first (a wrong architecture is an error, not a warning).
# Measured alternative (tools/analysis/compare_calibration.py: better
# accuracy right after calibration at every width tried, most at 2-bit
# activations): method='mse', weight_method='release'.
custom_hooks = [dict(type='CalibrationHook', num_batches=1, method='release')]
