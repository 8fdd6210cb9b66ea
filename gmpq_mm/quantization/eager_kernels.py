# Copyright (c) gmpq_mm contributors. All rights reserved.
"""The eager quantization kernels: plain PyTorch ops, few passes.

Every elementwise pass over an activation costs a full trip through memory
(and, on a busy CPU, a thread hand-off). These kernels write the integer
codes of all K candidates into one ``(K, N)`` buffer and let
matrix-vector products do the probability-weighted sum and the
per-candidate reductions (the probability and range gradients), so few
passes and no per-candidate temporaries are needed.

Arguments are the per-candidate constants of
:func:`.kernel_backend.candidate_table` / :func:`.kernel_backend.act_params`;
nothing here validates its input.
"""
from typing import Tuple

import torch
from torch import Tensor

__all__ = [
    'act_codes_eager', 'mix_rows', 'act_forward_eager', 'act_backward_eager',
    'safe_threshold', 'weight_forward_eager', 'weight_backward_eager'
]


def act_codes_eager(x_flat: Tensor, inv: Tensor, lo, hi,
                    fp_rows: Tuple[int, ...]) -> Tensor:
    """``(K, N)`` codes ``round(clamp(x * inv_k, lo_k, hi_k))``; FP rows: x.

    Row by row with scalar bounds: as much memory traffic as broadcasting
    over the (K, N) block, but plain vectorised loops.
    """
    codes = x_flat.new_empty((len(lo), x_flat.numel()))
    for k in range(len(lo)):
        if k in fp_rows:
            codes[k].copy_(x_flat)
        else:
            torch.mul(x_flat, inv[k], out=codes[k])
            codes[k].clamp_(lo[k], hi[k]).round_()
    return codes


def mix_rows(codes: Tensor, coef: Tensor) -> Tensor:
    """``sum_k coef_k * codes_k`` (consumes ``codes`` when K == 1)."""
    if codes.shape[0] == 1:
        return codes[0].mul_(coef[0])
    return torch.mv(codes.t(), coef)


def act_forward_eager(x, coef, inv, lo, hi, is_fp, fp_rows):
    """``sum_k coef_k * codes_k(x)`` with ``coef_k = p_k * s_k``."""
    codes = act_codes_eager(x.reshape(-1), inv, lo, hi, fp_rows)
    return mix_rows(codes, coef).view(x.shape)


def act_backward_eager(x,
                       g,
                       p,
                       scale,
                       inv,
                       lo,
                       hi,
                       is_fp,
                       fp_rows,
                       r_eff,
                       signed,
                       need_x,
                       need_p,
                       need_r,
                       codes=None):
    """Gradients of ``sum_k p_k q_k(x)`` w.r.t. ``x``, ``p`` and ``r``.

    ``codes``: the (K, N) codes of ``x`` if the caller has them already;
    they are overwritten.
    """
    x_flat, g_flat = x.reshape(-1), g.reshape(-1)
    grad_x = grad_p = grad_r = None
    buf = codes
    if len(lo) == 1 and not fp_rows and (need_x or need_r):
        # One quantized candidate (a fixed-bit layer): plain masks.
        if need_p:
            grad_p = scale * torch.dot(
                g_flat,
                act_codes_eager(x_flat, inv, lo, hi, fp_rows)[0]
                if buf is None else buf[0])
        grad_x, grad_r = _act_backward_single_eager(x_flat, g_flat, p, r_eff,
                                                    signed)
        return grad_x.view(x.shape), grad_p, grad_r
    if need_p:
        # sum(g * q_k) = s_k * <codes_k, g>
        if buf is None:
            buf = act_codes_eager(x_flat, inv, lo, hi, fp_rows)
        grad_p = torch.mv(buf, g_flat).mul_(scale)
    if need_x or need_r:
        if buf is None:
            buf = x_flat.new_empty((p.numel(), x_flat.numel()))
        x_row = x_flat.unsqueeze(0)
        torch.gt(x_row, r_eff.unsqueeze(1), out=buf)  # 1[x > r_k]
        if need_r:
            grad_r = torch.mv(buf, g_flat)
        if need_x:
            blocked = torch.mv(buf.t(), p)  # sum_k p_k 1[x > r_k]
        if signed:
            torch.lt(x_row, -r_eff.unsqueeze(1), out=buf)  # 1[x < -r_k]
            if need_r:
                grad_r.sub_(torch.mv(buf, g_flat))
            if need_x:
                blocked.add_(torch.mv(buf.t(), p))
        del buf
        if need_r:
            grad_r.mul_(p)
        if need_x:
            # Weight of the candidates whose STE passes each element.
            if signed:
                passed = blocked.neg_().add_(p.sum())
            else:
                passed = blocked.neg_().add_(p.masked_fill(is_fp, 0).sum())
                # Unsigned quantizers block x < 0; FP candidates never block.
                passed.masked_fill_(x_flat < 0, 0)
                if fp_rows:
                    passed.add_(p[list(fp_rows)].sum())
            grad_x = passed.mul_(g_flat).view(x.shape)
    return grad_x, grad_p, grad_r


def _act_backward_single_eager(x_flat, g_flat, p, r_eff, signed):
    """``grad_x = p g 1[lo <= x <= r]`` and ``grad_r = p sum(g dq/dr)`` of
    one quantizer, in a few passes."""
    above = torch.gt(x_flat, r_eff[0], out=torch.empty_like(g_flat))
    grad_r = torch.dot(above, g_flat)
    if signed:
        below = torch.lt(x_flat, -r_eff[0], out=torch.empty_like(g_flat))
        grad_r = grad_r - torch.dot(below, g_flat)
        passed = below.add_(above).neg_().add_(1)  # 1 - above - below
    else:
        passed = torch.ge(x_flat, 0, out=torch.empty_like(g_flat))
        passed.sub_(above)  # 1[x >= 0] - 1[x > r] = 1[0 <= x <= r]
    del above
    grad_x = passed.mul_(g_flat).mul_(p[0])
    return grad_x, (grad_r * p).reshape(1)


def safe_threshold(t: Tensor) -> Tensor:
    # T == 0 only for an all-zero weight (or channel): any divisor works.
    return torch.where(t > 0, t, torch.ones_like(t))


def _weight_codes_eager(u_flat, levels, lo, hi, fp_rows, clamp):
    """``(K, N)`` codes ``round(clamp(u * n_k, -n_k, n_k))``, ``u = w / T``.
    """
    codes = u_flat.new_empty((len(levels), u_flat.numel()))
    for k in range(len(levels)):
        if k in fp_rows:
            codes[k].copy_(u_flat)
            continue
        torch.mul(u_flat, levels[k], out=codes[k])
        if clamp:  # with T = max|w| the codes are already within +-n
            codes[k].clamp_(lo[k], hi[k])
        codes[k].round_()
    return codes


def weight_forward_eager(w, p, t, n, levels, lo, hi, fp_rows, clamp):
    """``T * sum_k (p_k / n_k) * codes_k``."""
    u_flat = (w / safe_threshold(t)).reshape(-1)
    codes = _weight_codes_eager(u_flat, levels, lo, hi, fp_rows, clamp)
    return mix_rows(codes, p / n).view(w.shape).mul_(t)


def weight_backward_eager(w, g, p, t, n, levels, lo, hi, fp_rows, clamp):
    """``grad_w = g * sum(p)`` (identity STE), ``grad_p_k = sum(g q_k)``."""
    u_flat = (w / safe_threshold(t)).reshape(-1)
    codes = _weight_codes_eager(u_flat, levels, lo, hi, fp_rows, clamp)
    grad_p = torch.mv(codes, (g * t).reshape(-1)).div_(n)
    return g * p.sum(), grad_p
