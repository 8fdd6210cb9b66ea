_base_ = ['mmpretrain::_base_/default_runtime.py']

# Registers gmpq_mm's types into mmpretrain's registries.
custom_imports = dict(imports=['gmpq_mm'], allow_failed_imports=False)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(
        type='CheckpointHook', interval=1, max_keep_ckpts=3, save_last=True))
