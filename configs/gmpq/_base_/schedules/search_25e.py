# The paper's search schedule (released flags --epochs 25 --step-epoch 10
# --lr 0.1 --lra 0.01): two SGD optimizers, LR x0.1 every 10 epochs.
optim_wrapper = dict(
    constructor='SearchOptimWrapperConstructor',
    weights=dict(
        optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4)),
    arch=dict(
        optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=1e-4)))
# One scheduler list per optimizer (a plain list would drive both the same
# way only by accident).
param_scheduler = dict(
    weights=[dict(type='StepLR', step_size=10, gamma=0.1, by_epoch=True)],
    arch=[dict(type='StepLR', step_size=10, gamma=0.1, by_epoch=True)])
train_cfg = dict(
    type='SearchLoop', mode='bilevel', max_epochs=25, val_interval=5)
val_cfg = dict()
test_cfg = dict()
custom_hooks = [dict(type='PolicyExportHook')]
