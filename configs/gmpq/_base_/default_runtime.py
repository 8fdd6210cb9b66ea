_base_ = ['mmpretrain::_base_/default_runtime.py']

# Registers gmpq_mm's types into mmpretrain's registries and its checkpoint
# loading into mmengine (gmpq_mm.utils.register_all_modules).
custom_imports = dict(
    imports=['gmpq_mm.register_all'], allow_failed_imports=False)

# Scalars (losses, lr, a search's expected_gbitops / mean_w_bits /
# mean_a_bits) go to the log and to WORK_DIR/<timestamp>/vis_data/
# scalars.json every `interval` iterations (mmpretrain's LocalVisBackend).
# TensorBoard as well (pip install tensorboard; tensorboard --logdir
# WORK_DIR): uncomment here or put it in your config.
# visualizer = dict(vis_backends=[
#     dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')])
# quant_kernels: eager quantization kernels for a short run, compiled ones
# (torch.compile, cached on disk) for a run long enough to earn the compile
# time back (gmpq_mm.engine.QuantKernelHook); None: eager throughout.
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    quant_kernels=dict(type='QuantKernelHook'),
    checkpoint=dict(
        type='CheckpointHook', interval=1, max_keep_ckpts=3, save_last=True))
