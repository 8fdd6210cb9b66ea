"""How much each layer's loss grows when that layer alone is quantized.

Two measures of the sensitivity ``S_l(w, a)`` of layer ``l`` to ``w``-bit
weights and ``a``-bit inputs, both estimates of the same quantity -- the
increase of the loss on calibration batches -- so that their numbers can be
compared (``docs/user_guides/sensitivity.md``):

* ``'hessian'`` (HAWQ-V2 style, second order, separable):
  ``S = 1/2 * tr(H_W)/n_W * |Q_w(W) - W|^2 + 1/2 * tr(H_x)/n_x *
  |Q_a(x) - x|^2``, where ``tr(H_W)`` is the Hessian trace of the loss with
  respect to the layer's weight (Hutchinson's estimator,
  :mod:`.hessian`), ``tr(H_x)`` the same with respect to the layer's input
  (the whole batch tensor), ``n`` their element counts, and the squared
  errors are those of the quantizers the finetune would use (thresholds and
  ranges from :mod:`.calibration`). It is the second-order Taylor
  expansion of the loss for a perturbation spread evenly over the
  Hessian's eigen-directions, applied to the weight and the input
  separately (their cross term is dropped). A negative trace estimate (a
  block that is not convex there, or noise) counts as 0.
* ``'perturbation'`` (direct): ``S = L(layer l at (w, a)) - L(FP)``,
  measured by running the network with only layer ``l`` quantized, for
  every layer and pair. Exact for one layer at a time; costs
  ``layers x pairs x batches`` forwards.

Summing ``S_l`` over layers (what the allocation minimises) assumes the
layers' effects add up, as every sensitivity-based allocation does.

Pure PyTorch: nothing from mmengine / mmpretrain is imported.
"""
import contextlib
import math
from collections import OrderedDict
from typing import Callable, Iterator, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bits import check_candidates
from .calibration import (DEFAULT_METHOD, activation_range,
                          magnitude_histogram, weight_calibration)
from .hessian import hutchinson_traces, train_flags_kept
from .layers import is_mixed_layer, is_quantized_layer
from .quantizers import quantize_activation, quantize_weight
from .solver import Constraint, solve_policy

__all__ = [
    'METHODS', 'quantizer_settings', 'hessian_sensitivity',
    'perturbation_sensitivity', 'layer_sensitivity', 'allocate_bits'
]

METHODS = ('hessian', 'perturbation')
LossFn = Callable[[nn.Module, object], Tensor]
Bits = Tuple[int, int]
# Histogram bins for the activation ranges (the calibration's default).
_BINS = 2048


def _plain_layers(model: nn.Module,
                  names: Sequence[str]) -> 'OrderedDict[str, nn.Module]':
    """The named full-precision conv / linear modules, or a ValueError."""
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f'unknown layer name(s) {unknown} in '
                         f'{type(model).__name__}')
    out = OrderedDict()
    for name in names:
        module = modules[name]
        if is_mixed_layer(module) or is_quantized_layer(module) or \
                not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise ValueError(f'layer {name!r} is a {type(module).__name__}; '
                             'sensitivity needs the full-precision '
                             'nn.Conv2d / nn.Linear network')
        out[name] = module
    if not out:
        raise ValueError('no layers given')
    return out


@contextlib.contextmanager
def _observed_inputs(layers: Mapping[str, nn.Module],
                     fn: Callable[[str, Tensor], None]) -> Iterator[None]:
    handles = [
        m.register_forward_pre_hook(
            lambda module, args, name=name: fn(name, args[0]))
        for name, m in layers.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run(model: nn.Module, loss_fn: LossFn, batches: Sequence) -> float:
    """Mean loss over ``batches`` (eval mode, no grad)."""
    with train_flags_kept(model), torch.no_grad():
        return sum(float(loss_fn(model, b)) for b in batches) / len(batches)


def quantizer_settings(model: nn.Module,
                       names: Sequence[str],
                       loss_fn: LossFn,
                       batches: Sequence,
                       w_candidates: Sequence[int],
                       a_candidates: Sequence[int],
                       signed: Optional[Mapping[str, bool]] = None,
                       calib_method: str = DEFAULT_METHOD,
                       per_channel: bool = False) -> 'OrderedDict[str, dict]':
    """Per layer and bit width, the quantizer the finetune would use and
    its squared error on the calibration batches.

    Weight thresholds and activation ranges follow
    :func:`~.calibration.calibrate_model` (``calib_method``, ranges capped
    at 6, the maximum from 5 bits up), from the FP network's inputs;
    ``per_channel`` as the layers' ``per_channel`` option.

    Returns:
        OrderedDict: ``name -> {'signed', 'w_threshold': {b: Tensor|None},
        'w_error': {b: |Q(W) - W|^2}, 'a_range': {b: r}, 'a_error': {b:
        mean over batches of |Q(x) - x|^2 over the batch tensor}}``.
    """
    layers = _plain_layers(model, names)
    w_cands = check_candidates(w_candidates, 'w_candidates')
    a_cands = check_candidates(a_candidates, 'a_candidates')
    batches = list(batches)
    if not batches:
        raise ValueError('sensitivity needs at least one calibration batch')
    signed = {n: bool((signed or {}).get(n, False)) for n in layers}
    out = OrderedDict()
    for name, module in layers.items():
        thresholds, errors = {}, {}
        with torch.no_grad():
            for b in w_cands:
                t = weight_calibration(
                    module.weight, b, calib_method, per_channel=per_channel)
                thresholds[b] = t
                q = quantize_weight(
                    module.weight, b, threshold=t, per_channel=per_channel)
                errors[b] = float(((q - module.weight)**2).sum())
        out[name] = dict(
            signed=signed[name],
            per_channel=bool(per_channel),
            w_threshold=thresholds,
            w_error=errors,
            a_range={},
            a_error={})

    # Activations: maxima, then histograms (as the calibration), then the
    # squared error of each candidate's quantizer.
    maxima = dict.fromkeys(layers, 0.0)
    hists = {n: torch.zeros(_BINS, dtype=torch.float64) for n in layers}
    sq_err = {n: dict.fromkeys(a_cands, 0.0) for n in layers}

    def see_max(name, x):
        mag = x.detach().abs() if signed[name] else x.detach().clamp_min(0)
        if mag.numel():
            maxima[name] = max(maxima[name], float(mag.max()))

    def see_hist(name, x):
        hists[name] += magnitude_histogram(x, maxima[name], _BINS,
                                           signed[name])

    def see_error(name, x):
        for b, r in out[name]['a_range'].items():
            q = quantize_activation(x, r, b, signed[name])
            sq_err[name][b] += float(((q - x)**2).sum())

    for fn in (see_max, see_hist):
        with _observed_inputs(layers, fn):
            _run(model, loss_fn, batches)
    for name in layers:
        for b in a_cands:
            r = activation_range(hists[name], maxima[name], b, signed[name],
                                 calib_method)
            out[name]['a_range'][b] = r if r > 0 else 6.0  # a dead input
    with _observed_inputs(layers, see_error):
        _run(model, loss_fn, batches)
    for name in layers:
        out[name]['a_error'] = {
            b: v / len(batches)
            for b, v in sq_err[name].items()
        }
    return out


def hessian_sensitivity(model: nn.Module,
                        names: Sequence[str],
                        loss_fn: LossFn,
                        batches: Sequence,
                        settings: Mapping[str, dict],
                        num_samples: int = 8,
                        seed: int = 0) -> 'OrderedDict[str, dict]':
    """Second-order sensitivity of every layer and (w, a) pair.

    Args:
        model, names, loss_fn, batches: As for :func:`quantizer_settings`.
        settings: What :func:`quantizer_settings` returned (its bit widths
            are the pairs scored).
        num_samples: Rademacher vectors per batch.
        seed: Seed of the vectors.

    Returns:
        OrderedDict: ``name -> {'sensitivity': {(w, a): S}, 'weight_trace',
        'weight_numel', 'input_trace', 'input_numel'}`` (traces as
        estimated, before the clamp at 0) and the traces' standard errors
        ``'weight_trace_se'`` / ``'input_trace_se'``.
    """
    layers = _plain_layers(model, names)
    traces = hutchinson_traces(
        model,
        loss_fn,
        batches, {
            n: m.weight
            for n, m in layers.items()
        },
        inputs_of=list(layers),
        num_samples=num_samples,
        seed=seed)
    out = OrderedDict()
    for name, module in layers.items():
        s = settings[name]
        n_w = module.weight.numel()
        n_x = traces['input_numel'][name]
        t_w, t_x = traces['weight'][name], traces['input'][name]
        per_w = max(t_w, 0.0) / n_w
        per_x = max(t_x, 0.0) / n_x
        sens = OrderedDict(
            ((w, a), 0.5 * (per_w * s['w_error'][w] + per_x * s['a_error'][a]))
            for w in s['w_error'] for a in s['a_error'])
        out[name] = dict(
            sensitivity=sens,
            weight_trace=t_w,
            weight_trace_se=traces['weight_se'][name],
            input_trace_se=traces['input_se'][name],
            weight_numel=int(n_w),
            input_trace=t_x,
            input_numel=int(n_x))
    return out


def _quantized_forward(module: nn.Module, w_q: Tensor, r: float, bits: int,
                       signed: bool) -> Callable:
    if isinstance(module, nn.Conv2d):
        return lambda x: module._conv_forward(
            quantize_activation(x, r, bits, signed), w_q, module.bias)
    return lambda x: F.linear(
        quantize_activation(x, r, bits, signed), w_q, module.bias)


def perturbation_sensitivity(
        model: nn.Module, names: Sequence[str], loss_fn: LossFn,
        batches: Sequence,
        settings: Mapping[str,
                          dict]) -> Tuple[float, 'OrderedDict[str, dict]']:
    """Loss increase with one layer at a time quantized at each (w, a).

    Returns:
        tuple: the FP loss, and ``name -> {'sensitivity': {(w, a): L_q -
        L_fp}}`` (mean loss over ``batches``; may be negative when
        quantizing happens to help on these batches).
    """
    layers = _plain_layers(model, names)
    batches = list(batches)
    base = _run(model, loss_fn, batches)
    out = OrderedDict()
    for name, module in layers.items():
        s = settings[name]
        sens = OrderedDict()
        for w in s['w_error']:
            with torch.no_grad():
                w_q = quantize_weight(
                    module.weight,
                    w,
                    threshold=s['w_threshold'][w],
                    per_channel=s['per_channel'])
            for a in s['a_error']:
                module.forward = _quantized_forward(module, w_q,
                                                    s['a_range'][a], a,
                                                    s['signed'])
                try:
                    sens[(w, a)] = _run(model, loss_fn, batches) - base
                finally:
                    del module.forward
        out[name] = dict(sensitivity=sens)
    return base, out


def layer_sensitivity(model: nn.Module,
                      names: Sequence[str],
                      loss_fn: LossFn,
                      batches: Sequence,
                      w_candidates: Sequence[int],
                      a_candidates: Sequence[int],
                      method: str = 'hessian',
                      signed: Optional[Mapping[str, bool]] = None,
                      calib_method: str = DEFAULT_METHOD,
                      per_channel: bool = False,
                      num_samples: int = 8,
                      seed: int = 0) -> dict:
    """Sensitivity of each named layer to each (w, a) candidate pair.

    Args:
        model: The full-precision network (plain ``nn.Conv2d`` /
            ``nn.Linear`` at ``names``); left unchanged.
        names: Module names of the searchable layers, in network order.
        loss_fn: ``loss_fn(model, batch) -> scalar`` (e.g. cross-entropy).
        batches: Calibration batches for ``loss_fn`` (kept in a list).
        w_candidates / a_candidates: Bit widths to score.
        method: ``'hessian'`` or ``'perturbation'`` (module doc).
        signed: ``name -> bool``: layers whose input can be negative
            (signed activation quantizer); default none.
        calib_method: Thresholds and ranges, as the finetune's
            calibration (``'release'``, ``'kl'``, ``'mse'``, ``'max'``).
        per_channel: Per-output-channel weight thresholds.
        num_samples / seed: Hutchinson vectors (``'hessian'`` only).

    Returns:
        dict: ``'method'``, ``'base_loss'`` (FP mean loss), ``'batches'``
        and ``'layers'``: ``name -> {'sensitivity': {(w, a): S}, ...,
        'w_error', 'a_error', 'a_range'}``.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> batches = [(torch.randn(16, 4), torch.randint(3, (16,)))]
        >>> ce = lambda m, b: F.cross_entropy(m(b[0]), b[1])
        >>> out = layer_sensitivity(net, ['2'], ce, batches, (2, 8), (2, 8),
        ...                         method='perturbation')
        >>> s = out['layers']['2']['sensitivity']
        >>> sorted(s), s[(2, 2)] > s[(8, 8)]
        ([(2, 2), (2, 8), (8, 2), (8, 8)], True)
    """
    if method not in METHODS:
        raise ValueError(f'sensitivity method {method!r} is not one of '
                         f'{METHODS}')
    batches = list(batches)
    settings = quantizer_settings(model, names, loss_fn, batches, w_candidates,
                                  a_candidates, signed, calib_method,
                                  per_channel)
    if method == 'hessian':
        base = _run(model, loss_fn, batches)
        table = hessian_sensitivity(model, names, loss_fn, batches, settings,
                                    num_samples, seed)
    else:
        base, table = perturbation_sensitivity(model, names, loss_fn, batches,
                                               settings)
    for name, row in table.items():
        s = settings[name]
        row.update(
            w_error=dict(s['w_error']),
            a_error=dict(s['a_error']),
            a_range=dict(s['a_range']),
            signed=s['signed'])
    if not all(
            math.isfinite(v) for row in table.values()
            for v in row['sensitivity'].values()):
        raise ValueError('sensitivity is not finite (a NaN / inf loss on '
                         'the calibration batches?)')
    return dict(
        method=method, base_loss=base, batches=len(batches), layers=table)


def allocate_bits(sensitivity: Mapping[str, Mapping[Bits, float]],
                  constraints: Sequence[Constraint]) -> 'OrderedDict':
    """The policy of least total sensitivity within every constraint.

    An exact multiple-choice knapsack (:func:`~.solver.solve_policy` with
    ``score = -sensitivity``): one (w, a) pair per layer, every
    constraint's band met, ``sum_l S_l(pair_l)`` smallest.

    Args:
        sensitivity: ``name -> {(w, a): S}`` (e.g. the ``'sensitivity'``
            entries of :func:`layer_sensitivity`).
        constraints: Budgets, e.g. :func:`~.budget.bitops_constraint`.

    Returns:
        OrderedDict: ``name -> (w_bits, a_bits)``.

    Example:
        >>> from gmpq_mm.quantization.budget import bitops_constraint
        >>> sens = {'a': {(2, 2): 5.0, (4, 4): 0.0},
        ...         'b': {(2, 2): 1.0, (4, 4): 0.0}}
        >>> bitops = bitops_constraint({'a': 10, 'b': 10}, sens, 200)
        >>> dict(allocate_bits(sens, [bitops]))  # 'a' keeps its 4 bits
        {'a': (4, 4), 'b': (2, 2)}
    """
    scores = OrderedDict(
        (name, OrderedDict((tuple(p), -float(v)) for p, v in row.items()))
        for name, row in sensitivity.items())
    return solve_policy(scores, constraints)
