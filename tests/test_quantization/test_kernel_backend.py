"""Which quantization kernels run: 'auto', pinned backends, the fallback."""
import warnings

import pytest
import torch

from gmpq_mm.quantization import kernel_backend as kb
from gmpq_mm.quantization.quantizers import quantized_conv2d


@pytest.fixture
def backend_state():
    """Restore the module's backend state after the test."""
    saved = (kb._kernel_backend, kb._long_run, kb._compile_failed,
             dict(kb._compiled_kernels))
    kb._compiled_kernels.clear()
    yield kb
    (kb._kernel_backend, kb._long_run, kb._compile_failed) = saved[:3]
    kb._compiled_kernels.clear()
    kb._compiled_kernels.update(saved[3])


def conv_outputs():
    """Values and gradients of a mixed quantized conv (fixed inputs)."""
    torch.manual_seed(3)
    x = (torch.randn(2, 4, 6, 6) * 2).requires_grad_()
    w = torch.randn(5, 4, 3, 3, requires_grad=True)
    a_probs = torch.softmax(torch.randn(3), 0).requires_grad_()
    w_probs = torch.softmax(torch.randn(3), 0).requires_grad_()
    ranges = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    out = quantized_conv2d(
        x,
        w,
        a_bits=(2, 4, 32),
        w_bits=(2, 3, 8),
        a_probs=a_probs,
        a_ranges=ranges,
        w_probs=w_probs,
        signed=True,
        padding=1)
    grads = torch.autograd.grad((out * out).sum(),
                                [x, w, a_probs, w_probs, ranges])
    return (out.detach(), ) + grads


def test_auto_is_eager_until_a_long_run_is_planned(backend_state):
    kb.set_kernel_backend('auto')
    kb._long_run = False
    assert kb.get_kernel_backend() == 'eager'
    assert kb.get_kernel_backend_setting() == 'auto'
    # Below the threshold: eager; at it: compile.
    assert kb.plan_run(kb.AUTO_COMPILE_SAMPLES - 1) == 'eager'
    assert kb.plan_run(kb.AUTO_COMPILE_SAMPLES) == 'compile'
    # Larger images weigh more: 1/49 of the samples at 224 x 224.
    assert kb.plan_run(kb.AUTO_COMPILE_SAMPLES // 49 + 1,
                       224 * 224) == 'compile'
    assert kb.plan_run(kb.AUTO_COMPILE_SAMPLES // 49 - 1, 224 * 224) == 'eager'


def test_pinned_backend_ignores_the_plan(backend_state):
    kb.set_kernel_backend('eager')
    assert kb.plan_run(10**9) == 'eager'
    kb.set_kernel_backend('compile')
    assert kb.plan_run(1) == 'compile'
    with pytest.raises(ValueError, match='not one of'):
        kb.set_kernel_backend('triton')


def test_compile_path_matches_eager(backend_state, monkeypatch):
    # torch.compile replaced by the identity: the 'compile' path runs the
    # fused kernels as plain PyTorch, so their maths is checked against
    # the eager kernels in seconds (the slow tests compile for real).
    kb.set_kernel_backend('eager')
    eager = conv_outputs()
    monkeypatch.setattr(torch, 'compile', lambda fn, **kw: fn)
    kb.set_kernel_backend('auto')
    kb.plan_run(10**9)
    fused = conv_outputs()
    assert kb.get_kernel_backend() == 'compile'
    assert set(kb._compiled_kernels) == {
        'act_forward', 'act_backward', 'weight_forward', 'weight_backward'
    }
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiler_failure_falls_back_to_eager(backend_state, monkeypatch):
    kb.set_kernel_backend('eager')
    eager = conv_outputs()

    def broken(fn, **kwargs):
        raise RuntimeError('no C++ compiler')

    monkeypatch.setattr(torch, 'compile', broken)
    kb.set_kernel_backend('auto')
    kb.plan_run(10**9)
    with pytest.warns(UserWarning, match='no C.. compiler.*falling back'):
        fallback = conv_outputs()
    for a, b in zip(fallback, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Eager for the rest of the process, without warning again.
    assert kb.get_kernel_backend() == 'eager'
    assert kb.get_kernel_backend_setting() == 'auto'
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        conv_outputs()
