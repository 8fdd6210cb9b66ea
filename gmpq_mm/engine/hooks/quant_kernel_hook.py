"""Pick the quantization kernels for a training run by its length."""
from mmengine.hooks import Hook
from mmengine.logging import print_log

from gmpq_mm.quantization import is_mixed_layer, is_quantized_layer
from gmpq_mm.quantization.kernel_backend import (AUTO_COMPILE_SAMPLES,
                                                 get_kernel_backend_setting,
                                                 plan_run)
from gmpq_mm.registry import HOOKS
from gmpq_mm.utils.model import unwrap_model


def _batch_shape(data_batch):
    """``(images, pixels per image)`` of a batch as the dataloader gives
    it (a dict with ``inputs``: a tensor or a list of ``(C, H, W)``)."""
    inputs = data_batch.get('inputs') if isinstance(data_batch, dict) else None
    if inputs is None:
        return None
    if hasattr(inputs, 'shape'):
        if inputs.dim() < 3:
            return None
        return inputs.shape[0], inputs.shape[-1] * inputs.shape[-2]
    if isinstance(inputs, (list, tuple)) and inputs and all(
            hasattr(x, 'shape') and x.dim() >= 2 for x in inputs):
        return len(inputs), inputs[0].shape[-1] * inputs[0].shape[-2]
    return None


@HOOKS.register_module()
class QuantKernelHook(Hook):
    """Tell the ``'auto'`` kernel backend how long this training run is.

    At the first training iteration it counts the samples the run has left
    (iterations left x the batch it sees, weighted by the image size
    against 32 x 32) and calls
    :func:`gmpq_mm.quantization.kernel_backend.plan_run`: a run of at least
    ``AUTO_COMPILE_SAMPLES`` (20,000 at 32 x 32: about 300 iterations of
    batch 64, under one CIFAR-10 epoch) compiles the quantization kernels
    with ``torch.compile``, a shorter one keeps the eager kernels.
    Compiling falls back to eager, with a warning, where it fails. A backend
    pinned by ``GMPQ_QUANT_BACKEND`` or ``set_kernel_backend`` is left
    alone. A model without quantized layers changes nothing.

    The shared ``default_runtime.py`` registers it as
    ``default_hooks.quant_kernels``; ``quant_kernels=None`` in a config
    removes it (eager throughout).
    """

    priority = 'LOW'

    def __init__(self):
        self._planned = False

    def before_train(self, runner) -> None:
        self._planned = False

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if self._planned:
            return
        self._planned = True
        setting = get_kernel_backend_setting()
        model = unwrap_model(runner.model)
        if not any(
                is_mixed_layer(m) or is_quantized_layer(m)
                for m in model.modules()):
            return
        if setting != 'auto':
            print_log(f'quantization kernels: {setting} (pinned)')
            return
        shape = _batch_shape(data_batch)
        if shape is None:
            print_log('quantization kernels: eager (cannot read the batch '
                      'size from the data)')
            return
        images, pixels = shape
        iters_left = max(runner.max_iters - runner.iter, 0)
        samples = iters_left * images
        backend = plan_run(samples, pixels)
        print_log(f'quantization kernels: {backend} ({iters_left} '
                  f'iterations x {images} images of {pixels} pixels left; '
                  f'compiling pays off from {AUTO_COMPILE_SAMPLES} samples '
                  'at 32 x 32)')
