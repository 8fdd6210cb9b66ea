# Scale: 1 GPU x 256 images, 25 epochs.
# A model-size budget: the exported policy is the most likely one whose
# whole network (the 19 searched convs' weights packed at their bits, the
# stem, BatchNorm and classifier at 32 bits) takes 3.92-4.0 MB, about 11x
# smaller than the FP network's 44.7 MB (all 2-bit: 2.86 MB, all 4-bit:
# 5.64 MB). Set target_bitops as well to meet both budgets at once.
_base_ = ['./search_r18_cifar10.py']

model = dict(target_size_mb=4.0, target_size_mb_tolerance=0.02)
