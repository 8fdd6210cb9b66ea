# Copyright (c) gmpq_mm contributors. All rights reserved.
"""The quantization kernels for ``torch.compile``: the same maths as
:mod:`.eager_kernels`, written as plain functions.

Written candidate by candidate: the loop unrolls at trace time into plain
elementwise maths that inductor fuses into one pass over the tensor, with
no ``(K, N)`` buffer, whereas a reduction over a ``(K, N)`` view compiles
into a much slower strided loop.
"""
import torch

from .eager_kernels import safe_threshold

__all__ = [
    'act_forward_fused', 'act_backward_fused', 'weight_forward_fused',
    'weight_backward_fused'
]


def act_forward_fused(x, coef, inv, lo, hi, is_fp, fp_rows):
    out = None
    for k in range(len(lo)):
        if k in fp_rows:
            q = x
        else:
            q = torch.clamp(x * inv[k], lo[k], hi[k]).round()
        out = q * coef[k] if out is None else out + q * coef[k]
    return out


def act_backward_fused(x, g, p, scale, inv, lo, hi, is_fp, fp_rows, r_eff,
                       signed, need_x, need_p, need_r):
    grad_p, grad_r = [], []
    weight = None
    for k in range(len(lo)):
        if k in fp_rows:
            if need_p:
                grad_p.append((g * x).sum())
            grad_r.append(torch.zeros_like(p[k]))
            passed = torch.ones_like(x, dtype=torch.bool)
        else:
            if need_p:
                codes = torch.clamp(x * inv[k], lo[k], hi[k]).round()
                grad_p.append((g * codes).sum() * scale[k])
            above = x > r_eff[k]
            g_r = torch.where(above, g, 0).sum()
            passed = ~above
            if signed:
                below = x < -r_eff[k]
                g_r = g_r - torch.where(below, g, 0).sum()
                passed = passed & ~below
            else:
                passed = passed & (x >= 0)
            grad_r.append(g_r * p[k])
        term = passed * p[k]
        weight = term if weight is None else weight + term
    return (g * weight if need_x else None,
            torch.stack(grad_p) if need_p else None,
            torch.stack(grad_r) if need_r else None)


def weight_forward_fused(w, p, t, n, levels, lo, hi, fp_rows, clamp):
    u = w / safe_threshold(t)
    out = None
    for k in range(len(levels)):
        if k in fp_rows:
            term = u * p[k]
        else:
            codes = u * levels[k]
            if clamp:
                codes = torch.clamp(codes, lo[k], hi[k])
            term = codes.round() * (p[k] / levels[k])
        out = term if out is None else out + term
    return out * t


def weight_backward_fused(w, g, p, t, n, levels, lo, hi, fp_rows, clamp):
    u = w / safe_threshold(t)
    g_t = g * t
    grad_p = []
    for k in range(len(levels)):
        if k in fp_rows:
            grad_p.append((g_t * u).sum())
            continue
        codes = u * levels[k]
        if clamp:
            codes = torch.clamp(codes, lo[k], hi[k])
        grad_p.append((g_t * codes.round()).sum() / levels[k])
    return g * p.sum(), torch.stack(grad_p)
