# Scale: 1 GPU x 256 images, 25 epochs.
# A BitOPs budget instead of tuning cd by trial: the exported policy is the
# most likely one (summed log-softmax of the alphas) whose BitOPs over the
# 19 searched convs at 32x32 stay within target_bitops -- here 8.9 GBitOPs,
# i.e. about 4 bits x 4 bits on average (553.6 MMACs x 16).
_base_ = ['./search_r18_cifar10.py']

model = dict(target_bitops=8.9e9)
