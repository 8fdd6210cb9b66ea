# Copyright (c) gmpq_mm contributors. All rights reserved.
"""The autograd functions of the quantizers.

Each keeps only its inputs and recomputes what backward needs: letting
autograd record every candidate would keep ``K`` quantized copies of each
activation alive until backward. :class:`QuantConv2dFunction` goes one
step further for a whole layer: it keeps the conv input ``x`` (which the
preceding ReLU keeps anyway) instead of the quantized ``x~`` and
recomputes ``x~`` in backward. Use them through :mod:`.quantizers`.
"""
from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from .bits import FP_BITS
from .eager_kernels import act_backward_eager, act_codes_eager, mix_rows
from .kernel_backend import (act_params, autocast_off, candidate_table,
                             get_kernel_backend, run_kernel)

__all__ = [
    'MixedActivationFunction', 'MixedWeightFunction', 'ConvSpec',
    'QuantConv2dFunction'
]


def _act_forward(x, probs, ranges, bits, signed) -> Tensor:
    """``sum_k p_k q_a(x; r_k, b_k)`` (no autograd)."""
    table, inv, scale, _ = act_params(ranges, bits, signed, x.dtype)
    coef = probs.detach().to(x.dtype) * scale
    return run_kernel('act_forward', x, coef, inv, table.lo, table.hi,
                      table.is_fp, table.fp_rows)


def _act_recompute(x, probs, ranges, bits, signed, keep_codes: bool):
    """:func:`_act_forward` for a backward pass: ``(x~, codes)``.

    With ``keep_codes`` and the eager backend, ``codes`` are the (K, N)
    integer codes behind ``x~``, for :func:`_act_backward` to reuse instead
    of computing them again; otherwise ``None``.
    """
    if not (keep_codes and get_kernel_backend() == 'eager'):
        return _act_forward(x, probs, ranges, bits, signed), None
    table, inv, scale, _ = act_params(ranges, bits, signed, x.dtype)
    coef = probs.detach().to(x.dtype) * scale
    with autocast_off(x.device):
        codes = act_codes_eager(
            x.reshape(-1), inv, table.lo, table.hi, table.fp_rows)
        # mix_rows scales a single row in place: give it a copy.
        mixed = mix_rows(codes.clone() if len(bits) == 1 else codes, coef)
    return mixed.view(x.shape), codes


def _act_backward(x,
                  grad_out,
                  probs,
                  ranges,
                  bits,
                  signed,
                  need_x,
                  need_p,
                  need_r,
                  codes=None):
    """Gradients of :func:`_act_forward` w.r.t. ``x``, ``probs``,
    ``ranges`` (``None`` where not needed). ``codes``: what
    :func:`_act_recompute` returned, if anything (overwritten).
    """
    table, inv, scale, r_eff = act_params(ranges, bits, signed, x.dtype)
    args = (x, grad_out.contiguous(), probs.detach().to(x.dtype), scale, inv,
            table.lo, table.hi, table.is_fp, table.fp_rows, r_eff, signed,
            need_x, need_p, need_r)
    if codes is not None:
        with autocast_off(x.device):
            grads = act_backward_eager(*args, codes=codes)
    else:
        grads = run_kernel('act_backward', *args)
    grad_x, grad_p, grad_r = grads
    return (grad_x if need_x else None,
            grad_p.to(probs.dtype) if need_p else None,
            grad_r.to(ranges.dtype) if need_r else None)


def _weight_forward(w, probs, t, bits, clamp) -> Tensor:
    """``sum_j p_j q_w(w; T, b_j)`` (no autograd)."""
    table = candidate_table(bits, True, True, w.device, w.dtype)
    return run_kernel('weight_forward', w,
                      probs.detach().to(w.dtype), t, table.n, table.levels,
                      table.lo, table.hi, table.fp_rows, clamp)


def _weight_backward(w, grad_out, probs, t, bits, clamp, need_w, need_p):
    """Gradients of :func:`_weight_forward` w.r.t. ``w`` and ``probs``."""
    if not need_p:
        # The identity STE needs no recomputation.
        grad_w = grad_out * probs.detach().sum().to(w.dtype)
        return grad_w if need_w else None, None
    table = candidate_table(bits, True, True, w.device, w.dtype)
    grad_w, grad_p = run_kernel('weight_backward', w, grad_out.contiguous(),
                                probs.detach().to(w.dtype), t, table.n,
                                table.levels, table.lo, table.hi,
                                table.fp_rows, clamp)
    return grad_w if need_w else None, grad_p.to(probs.dtype)


class MixedActivationFunction(Function):
    """``sum_i p_i * q_a(x; r_i, b_i)``; keeps only ``x``, ``p`` and ``r``.

    With one candidate and ``p = [1]`` it is the plain PACT quantizer.
    """

    @staticmethod
    def forward(ctx, x: Tensor, probs: Tensor, ranges: Tensor,
                bits: Tuple[int, ...], signed: bool) -> Tensor:
        ctx.bits, ctx.signed = bits, signed
        ctx.save_for_backward(x, probs, ranges)
        return _act_forward(x, probs, ranges, bits, signed)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, probs, ranges = ctx.saved_tensors
        grads = _act_backward(x, grad_out, probs, ranges, ctx.bits, ctx.signed,
                              *ctx.needs_input_grad[:3])
        return grads + (None, None)


class MixedWeightFunction(Function):
    """``sum_j p_j * q_w(w; b_j)``; keeps only ``w``, ``p`` and ``T``.

    With one candidate and ``p = [1]`` it is the plain weight quantizer.
    """

    @staticmethod
    def forward(ctx, w: Tensor, probs: Tensor, t: Tensor,
                bits: Tuple[int, ...], clamp: bool) -> Tensor:
        ctx.bits, ctx.clamp = bits, clamp
        ctx.save_for_backward(w, probs, t)
        return _weight_forward(w, probs, t, bits, clamp)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        w, probs, t = ctx.saved_tensors
        grads = _weight_backward(w, grad_out, probs, t, ctx.bits, ctx.clamp,
                                 *ctx.needs_input_grad[:2])
        return grads + (None, None, None)


class ConvSpec(NamedTuple):
    """Static arguments of :class:`QuantConv2dFunction`."""
    a_bits: Tuple[int, ...]
    w_bits: Tuple[int, ...]
    signed: bool
    clamp: bool
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int


class QuantConv2dFunction(Function):
    """``conv2d(x~, W~)`` with quantized (mixed) operands.

    Autograd would keep ``x~`` alive for the weight gradient: a second copy
    of every searched layer's input next to ``x``, which the preceding ReLU
    keeps anyway. This function keeps ``x`` only and recomputes ``x~`` in
    backward (one elementwise pass), so the quantized network needs about
    the memory of the full-precision one.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a_probs, a_ranges, w_probs, t,
                spec: ConvSpec):
        x_q = (
            x if spec.a_bits == (FP_BITS, ) else _act_forward(
                x, a_probs, a_ranges, spec.a_bits, spec.signed))
        w_q = (
            weight if spec.w_bits == (FP_BITS, ) else _weight_forward(
                weight, w_probs, t, spec.w_bits, spec.clamp))
        out = F.conv2d(x_q, w_q, bias, spec.stride, spec.padding,
                       spec.dilation, spec.groups)
        ctx.spec = spec
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.bias_dtype = None if bias is None else bias.dtype
        # Under autocast the conv ran in a lower precision than its inputs;
        # its backward must run in that precision too.
        ctx.conv_dtype = out.dtype
        ctx.save_for_backward(x, weight, a_probs, a_ranges, w_probs, t, w_q)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, a_probs, a_ranges, w_probs, t, w_q = ctx.saved_tensors
        spec = ctx.spec
        (need_x, need_w, need_b, need_pa, need_r, need_pw, _,
         _) = ctx.needs_input_grad
        quant_a = spec.a_bits != (FP_BITS, )
        codes = None
        if quant_a:
            # The eager backend reuses the recomputed codes for the
            # probability gradients.
            x_q, codes = _act_recompute(
                x,
                a_probs,
                a_ranges,
                spec.a_bits,
                spec.signed,
                keep_codes=need_pa)
        else:
            x_q = x
        dtype = ctx.conv_dtype
        grad_xq, grad_wq, grad_b = torch.ops.aten.convolution_backward(
            grad_out.to(dtype), x_q.to(dtype), w_q.to(dtype), ctx.bias_sizes,
            spec.stride, spec.padding, spec.dilation, False, [0, 0],
            spec.groups,
            [need_x or need_pa or need_r, need_w or need_pw, need_b])
        del x_q
        if grad_xq is not None:
            grad_xq = grad_xq.to(x.dtype)
        if grad_wq is not None:
            grad_wq = grad_wq.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        grad_x = grad_pa = grad_r = grad_w = grad_pw = None
        if quant_a:
            if grad_xq is not None:
                grad_x, grad_pa, grad_r = _act_backward(
                    x,
                    grad_xq,
                    a_probs,
                    a_ranges,
                    spec.a_bits,
                    spec.signed,
                    need_x,
                    need_pa,
                    need_r,
                    codes=codes)
                del codes
        else:
            grad_x = grad_xq
        if spec.w_bits != (FP_BITS, ):
            if grad_wq is not None:
                grad_w, grad_pw = _weight_backward(weight, grad_wq, w_probs, t,
                                                   spec.w_bits, spec.clamp,
                                                   need_w, need_pw)
        else:
            grad_w = grad_wq
        return (grad_x, grad_w, grad_b if need_b else None, grad_pa, grad_r,
                grad_pw, None, None)
