"""QuantKernelHook: the run's length picks the kernels of 'auto'."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gmpq_mm.engine import QuantKernelHook
from gmpq_mm.quantization import kernel_backend as kb
from gmpq_mm.quantization.layers import QuantizedConv2d


@pytest.fixture
def auto_backend():
    saved = (kb._kernel_backend, kb._long_run, kb._compile_failed)
    kb.set_kernel_backend('auto')
    kb._long_run = False
    yield
    kb._kernel_backend, kb._long_run, kb._compile_failed = saved


def runner(model, max_iters, done=0):
    return SimpleNamespace(model=model, max_iters=max_iters, iter=done)


def quantized_net():
    return nn.Sequential(
        QuantizedConv2d(3, 4, 3, w_bits=4, a_bits=4, layer_name='0'))


def batch(n, size=32, as_list=True):
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    return dict(inputs=list(images) if as_list else images)


def first_iter(hook, run, data):
    hook.before_train(run)
    hook.before_train_iter(run, 0, data)


@pytest.mark.parametrize('as_list', [True, False])
def test_long_run_compiles_short_run_stays_eager(auto_backend, as_list):
    hook = QuantKernelHook()
    # 400 x 64 = 25,600 samples >= 20,000: compile.
    first_iter(hook, runner(quantized_net(), 400), batch(64, as_list=as_list))
    assert kb.get_kernel_backend() == 'compile'
    # A resumed run with 100 iterations left: 6,400 samples: eager.
    first_iter(hook, runner(quantized_net(), 400, 300), batch(64))
    assert kb.get_kernel_backend() == 'eager'
    # 224 x 224 images count 49 times: 10 x 64 x 49 = 31,360.
    first_iter(hook, runner(quantized_net(), 10), batch(64, 224))
    assert kb.get_kernel_backend() == 'compile'


def test_decides_once_per_run(auto_backend):
    hook = QuantKernelHook()
    run = runner(quantized_net(), 400)
    first_iter(hook, run, batch(64))
    assert kb.get_kernel_backend() == 'compile'
    run.iter = 399  # later iterations do not re-plan
    hook.before_train_iter(run, 399, batch(64))
    assert kb.get_kernel_backend() == 'compile'


def test_no_quantized_layers_or_pinned_changes_nothing(auto_backend):
    hook = QuantKernelHook()
    first_iter(hook, runner(nn.Conv2d(3, 4, 3), 10**6), batch(64))
    assert kb.get_kernel_backend() == 'eager'
    kb.set_kernel_backend('eager')
    first_iter(hook, runner(quantized_net(), 10**6), batch(64))
    assert kb.get_kernel_backend() == 'eager'
    assert kb.get_kernel_backend_setting() == 'eager'


def test_unreadable_batch_stays_eager(auto_backend):
    hook = QuantKernelHook()
    first_iter(hook, runner(quantized_net(), 10**6), dict(inputs=None))
    assert kb.get_kernel_backend() == 'eager'


def test_default_runtime_registers_the_hook():
    from mmengine.config import Config
    cfg = Config.fromfile('configs/gmpq/_base_/default_runtime.py')
    assert cfg.default_hooks.quant_kernels == dict(type='QuantKernelHook')
