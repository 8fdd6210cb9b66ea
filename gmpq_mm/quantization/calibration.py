"""Range calibration of fixed-bit layers before finetuning (pure PyTorch).

The released GMPQ finetune calibrates every quantizer once before training
(``docs/method.md``, Finetune and calibration):

* activation range ``r = min(6, max|x|, threshold)`` when ``b < 5``, else
  ``min(6, max|x|)``;
* weight threshold ``T = threshold`` when ``b < 5``, else ``max|W|``.

The released code calls its threshold "KL"; it is in fact a divergence
between the CDF of ``|x|`` and that CDF squeezed to ``2^(b-1)`` points and
back (``models/quantize_utils.py: _compute_threshold``, from HAQ). The
estimator is chosen by ``method``:

* ``'release'`` (default): that divergence, ported exactly
  (:func:`release_threshold`);
* ``'kl'``: TensorRT's entropy calibration (:func:`kl_threshold`): for
  every candidate number ``i`` of kept bins of a 2048-bin histogram, ``P``
  = the kept bins with the clipped mass folded into the last one, ``Q`` =
  the kept bins merged into as many chunks as the quantizer has values and
  spread back over the non-empty bins; the threshold minimises
  ``KL(P || Q)``. Made for 8 bits, it collapses at 2-3 bits on post-ReLU
  activations (thresholds of a few hundredths: the 0 spike dominates);
* ``'mse'``: the threshold of least quantization MSE on the histogram;
* ``'max'``: ``max|x|`` / ``max|W|`` throughout.

``b >= low_bits`` (5) always uses the maximum, as the released code does.

Statistics are collected with every quantizer of the network turned off
(:func:`float_forward`), as the release does (its calibration forward
returns the unquantized inputs): the ranges describe the FP network the
finetune starts from, and they do not depend on the order in which layers
are calibrated. Collection takes two passes over the same batches (maxima,
then fixed-range histograms) so that the statistics of several processes
can simply be summed (``reduce_max`` / ``reduce_sum`` callbacks): every rank
then computes the same thresholds.

Pure PyTorch: nothing from mmengine / mmpretrain is imported.
"""
import contextlib
import math
from collections import OrderedDict
from typing import Callable, Dict, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import is_quantized_layer
from .probe import eval_mode
from .quantizers import FP_BITS, activation_levels, weight_levels
from .quantizers import weight_threshold as current_weight_threshold

__all__ = [
    'DEFAULT_BINS', 'DEFAULT_ACT_CAP', 'DEFAULT_LOW_BITS', 'DEFAULT_METHOD',
    'METHODS', 'magnitude_histogram', 'kl_threshold', 'mse_threshold',
    'release_threshold', 'histogram_threshold', 'activation_range',
    'weight_calibration', 'quantization_mse', 'float_forward',
    'quantized_layers', 'collect_activation_stats', 'calibrate_model'
]

DEFAULT_BINS = 2048
DEFAULT_ACT_CAP = 6.0
DEFAULT_LOW_BITS = 5
METHODS = ('release', 'kl', 'mse', 'max')
DEFAULT_METHOD = 'release'
# Candidates evaluated at once (rows of the (C, bins) work matrices).
_CHUNK = 128


# ---------------------------------------------------------------------------
# Histograms and thresholds
# ---------------------------------------------------------------------------
def _magnitudes(x: Tensor, signed: bool) -> Tensor:
    """What the quantizer's clipping sees: ``|x|`` (symmetric quantizers)
    or ``max(x, 0)`` (unsigned: negatives map to 0 whatever the range)."""
    x = x.detach().reshape(-1)
    return x.abs() if signed else x.clamp_min(0)


def magnitude_histogram(x: Tensor,
                        max_value: float,
                        bins: int = DEFAULT_BINS,
                        signed: bool = True) -> Tensor:
    """Histogram of ``|x|`` (or ``max(x, 0)`` unsigned) over ``[0, max]``.

    Args:
        x (Tensor): Values.
        max_value (float): Upper edge; values above it land in the last bin.
        bins (int): Number of bins.
        signed (bool): ``|x|`` if True, else ``max(x, 0)``.

    Returns:
        Tensor: ``(bins,)`` float64 counts (exact up to 2^53).
    """
    mag = _magnitudes(x, signed).float()
    if max_value <= 0 or not math.isfinite(max_value):
        hist = torch.zeros(bins, dtype=torch.float64)
        hist[0] = mag.numel()
        return hist
    mag = mag.clamp_max(max_value)
    # On the activation's own device: only the counts travel.
    return torch.histc(
        mag, bins=bins, min=0.0, max=float(max_value)).double().cpu()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run small tensor ops on one thread: the (128, 2048) work matrices
    gain nothing from more, and lose a lot on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def kl_threshold(hist: Tensor, max_value: float, num_quant_bins: int) -> float:
    """TensorRT's entropy (KL) threshold of a magnitude histogram.

    Args:
        hist (Tensor): ``(bins,)`` counts over ``[0, max_value]``.
        max_value (float): The histogram's upper edge.
        num_quant_bins (int): Values the quantizer can produce for the
            magnitudes: ``2^b`` for a b-bit unsigned activation, ``2^(b-1)``
            for ``|W|`` of a b-bit weight (TensorRT int8: 128).

    Returns:
        float: The threshold (a bin edge); ``max_value`` when the histogram
        has no more bins than ``num_quant_bins``; 0 for an empty histogram.
    """
    hist = torch.as_tensor(hist, dtype=torch.float64).reshape(-1).cpu()
    nbins = hist.numel()
    total = float(hist.sum())
    if max_value <= 0 or total <= 0:
        return 0.0
    nq = int(num_quant_bins)
    if nq < 1:
        raise ValueError(f'num_quant_bins must be >= 1, got {num_quant_bins}')
    if nbins <= nq:
        return float(max_value)
    width = float(max_value) / nbins
    zero = torch.zeros(1, dtype=torch.float64)
    # Exclusive prefix sums: sums over any bin range [a, b) by differences.
    cum = torch.cat([zero, torch.cumsum(hist, 0)])
    cum_nz = torch.cat([zero, torch.cumsum((hist > 0).double(), 0)])
    with _one_thread():
        best_i = _kl_search(hist, total, nq, cum, cum_nz, zero)
    return best_i * width


def _kl_search(hist: Tensor, total: float, nq: int, cum: Tensor,
               cum_nz: Tensor, zero: Tensor) -> int:
    """The number of kept bins ``i`` (``nq..bins``) of least KL."""
    nbins = hist.numel()
    nonzero = hist > 0
    jj = torch.arange(nq + 1)
    best_kl, best_i = math.inf, nbins
    for chunk in torch.arange(nq, nbins + 1).split(_CHUNK):
        c, kmax = chunk.numel(), int(chunk[-1])
        rows = torch.arange(c)
        i = chunk.unsqueeze(1)  # (C, 1) candidate numbers of kept bins
        k = torch.arange(kmax).unsqueeze(0)  # (1, K) only bins < max(i)
        keep = k < i
        h = hist[:kmax].unsqueeze(0)
        # P: the kept bins, the clipped mass folded into the last one.
        p = torch.where(keep, h, zero)
        p[rows, chunk - 1] += total - cum[chunk]
        # Q: the kept (unclipped) bins merged into nq chunks (chunk
        # j = floor(k * nq / i) starts at ceil(j * i / nq)), each chunk's
        # mass spread evenly over its non-empty bins.
        starts = torch.div(
            jj.unsqueeze(0) * i + nq - 1, nq,
            rounding_mode='floor')  # (C, nq + 1)
        mass = cum[starts[:, 1:]] - cum[starts[:, :-1]]
        count = cum_nz[starts[:, 1:]] - cum_nz[starts[:, :-1]]
        j = torch.div(k * nq, i, rounding_mode='floor').clamp_max(nq - 1)
        q = (mass / count.clamp_min(1)).gather(1, j)
        q = torch.where(keep & nonzero[:kmax].unsqueeze(0), q, zero)
        p = p / total
        q = q / cum[chunk].unsqueeze(1)  # spreading keeps the kept mass
        pos = p > 0
        ratio = torch.where(pos, p / q, torch.ones((), dtype=torch.float64))
        kl = torch.where(pos, p * torch.log(ratio), zero).sum(1)  # q=0: inf
        kl = torch.nan_to_num(kl, nan=math.inf)
        value, idx = torch.min(kl, 0)  # first minimum: the smallest i
        if float(value) < best_kl:
            best_kl, best_i = float(value), int(chunk[idx])
    return best_i


def quantization_mse(values: Tensor, threshold: float, levels: int) -> float:
    """Mean squared error of quantizing ``values`` (magnitudes, >= 0) to
    ``round(clamp(v, 0, t) / s) * s`` with ``s = t / levels``."""
    v = values.detach().double().reshape(-1)
    if threshold <= 0:
        return float((v * v).mean())
    s = threshold / levels
    q = torch.round(v.clamp(0, threshold) / s) * s
    return float(((q - v)**2).mean())


def mse_threshold(hist: Tensor, max_value: float, levels: int) -> float:
    """The clipping threshold with the least quantization MSE.

    Every bin's mass sits at its centre; every bin edge ``i * width`` is a
    candidate threshold of a quantizer with ``levels`` positive steps
    (``2^b - 1`` unsigned activations, ``2^(b-1) - 1`` weights).

    Returns:
        float: The threshold (smallest on ties); 0 for an empty histogram.
    """
    hist = torch.as_tensor(hist, dtype=torch.float64).reshape(-1).cpu()
    nbins = hist.numel()
    if max_value <= 0 or float(hist.sum()) <= 0:
        return 0.0
    width = float(max_value) / nbins
    centres = (torch.arange(nbins, dtype=torch.float64) + 0.5) * width
    zero = torch.zeros(1, dtype=torch.float64)
    with _one_thread():
        return _mse_search(hist, width, centres, levels, zero,
                           float(max_value))


def _mse_search(hist: Tensor, width: float, centres: Tensor, levels: int,
                zero: Tensor, max_value: float) -> float:
    """The bin edge of least histogram quantization error."""
    nbins = hist.numel()
    # Suffix sums of h, h*c, h*c^2: the clipped bins' error in closed form.
    tail = [
        torch.cat([torch.flip(torch.cumsum(torch.flip(v, [0]), 0), [0]), zero])
        for v in (hist, hist * centres, hist * centres * centres)
    ]
    best_err, best_t = math.inf, max_value
    for chunk in torch.arange(1, nbins + 1).split(_CHUNK * 2):
        kmax = int(chunk[-1])
        t = chunk.double().unsqueeze(1) * width  # (C, 1)
        s = t / levels
        c = centres[:kmax].unsqueeze(0)
        inside = c < t  # bins whose centre is below t: rounding error
        q = torch.round(c / s) * s
        err = torch.where(inside, (q - c)**2 * hist[:kmax].unsqueeze(0),
                          zero).sum(1)
        # The bins k >= i (centres above t = i * width) clip to t.
        t1 = t.squeeze(1)
        err = err + (
            tail[2][chunk] - 2 * t1 * tail[1][chunk] +
            t1 * t1 * tail[0][chunk])
        value, idx = torch.min(err, 0)
        if float(value) < best_err:
            best_err, best_t = float(value), float(t1[idx])
    return best_t


def release_threshold(hist: Tensor, max_value: float, bits: int) -> float:
    """The released GMPQ code's "KL" threshold (``_compute_threshold``).

    The release (inherited from HAQ) does not compare distributions with
    TensorRT's KL: on the normalised CDF ``c`` of the histogram it takes,
    for every ``i`` in ``n+1 .. bins`` (``n = 2^(b-1)``, for activations and
    weights alike), ``p = c`` with ``p[i-1:] = 1``, squeezes ``p[:i]`` to
    ``n`` points and back by linear interpolation (``q``; ``q[i:] = 1``),
    and scores ``sum (c - q) * log2(c / q)``; the threshold is
    ``(i + 0.5) * width`` of the best ``i``. Ported faithfully (the release
    used ``sqrt(N)`` bins; here the histogram's), except that ``0 * log 0``
    terms count as 0 and undefined scores as +inf where numpy's argmin
    would have picked the first NaN.
    """
    hist = torch.as_tensor(hist, dtype=torch.float64).reshape(-1).cpu()
    nbins = hist.numel()
    total = float(hist.sum())
    if max_value <= 0 or total <= 0:
        return 0.0
    width = float(max_value) / nbins
    n = 2**(int(bits) - 1)
    if n + 1 > nbins:
        return float(max_value)
    with _one_thread():
        best_i = _release_search(torch.cumsum(hist, 0) / total, n)
    return (best_i + 0.5) * width


def _divergence_terms(c: Tensor, q: Tensor) -> Tensor:
    """``(c - q) * log2(c / q)``, 0 where ``c == q`` (``0 log 0`` too)."""
    with torch.no_grad():
        terms = (c - q) * torch.log2(c / q)
    return torch.where(c == q, torch.zeros((), dtype=c.dtype), terms)


def _release_search(cdf: Tensor, n: int) -> int:
    nbins = cdf.numel()
    one = torch.ones((), dtype=torch.float64)
    # Bins at or past i score (c - 1) * log2(c) (q = 1 there): suffix sums.
    tail_terms = _divergence_terms(cdf, one.expand_as(cdf))
    tail = torch.cat([
        torch.flip(torch.cumsum(torch.flip(tail_terms, [0]), 0), [0]),
        torch.zeros(1, dtype=torch.float64)
    ])
    x_n = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else \
        torch.zeros(1, dtype=torch.float64)
    best_d, best_i = math.inf, nbins
    for chunk in torch.arange(n + 1, nbins + 1).split(_CHUNK):
        kmax = int(chunk[-1])
        i = chunk.unsqueeze(1)  # (C, 1)
        k = torch.arange(kmax).unsqueeze(0)  # (1, K)
        # p: the CDF with p[i-1:] = 1, on the first i points.
        p = torch.where(k < i - 1, cdf[:kmax].unsqueeze(0), one)
        # p[:i] at n evenly spaced points (np.interp on linspace(0,1,i)).
        t = x_n.unsqueeze(0) * (i - 1)  # (C, n) positions in p's index
        lo = t.floor().long().clamp(max=kmax - 1)
        hi = torch.minimum(lo + 1, i - 1)
        frac = t - lo
        p_n = p.gather(1, lo) * (1 - frac) + p.gather(1, hi) * frac
        # ... and back onto i points.
        if n > 1:
            t2 = k.double() / (i - 1).double() * (n - 1)  # (C, K)
            lo2 = t2.floor().long().clamp(0, n - 1)
            hi2 = (lo2 + 1).clamp_max(n - 1)
            frac2 = t2 - lo2
            q = p_n.gather(1, lo2) * (1 - frac2) + p_n.gather(1, hi2) * frac2
        else:
            q = p_n.expand(-1, kmax)
        inside = _divergence_terms(cdf[:kmax].unsqueeze(0), q)
        d = torch.where(k < i, inside, torch.zeros((), dtype=torch.float64))
        d = d.sum(1) + tail[chunk]
        d = torch.nan_to_num(d, nan=math.inf)
        value, idx = torch.min(d, 0)
        if float(value) < best_d:
            best_d, best_i = float(value), int(chunk[idx])
    return best_i


def histogram_threshold(hist: Tensor,
                        max_value: float,
                        method: str,
                        bits: int,
                        for_weight: bool = False,
                        signed: bool = False) -> float:
    """``method``'s clipping threshold of a b-bit quantizer.

    ``levels`` (positive steps): ``2^(b-1) - 1`` for weights and signed
    activations, ``2^b - 1`` for unsigned activations; the KL quantizer
    has ``levels + 1`` magnitudes.
    """
    levels = (
        weight_levels(bits) if for_weight else activation_levels(bits, signed))
    if method == 'kl':
        return kl_threshold(hist, max_value, levels + 1)
    if method == 'mse':
        return mse_threshold(hist, max_value, levels)
    if method == 'release':
        return release_threshold(hist, max_value, bits)
    if method == 'max':
        return float(max_value)
    raise ValueError(f'calibration method {method!r} is not one of {METHODS}')


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(
            f'calibration method {method!r} is not one of {METHODS}')
    return method


def activation_range(hist: Tensor,
                     max_value: float,
                     bits: int,
                     signed: bool = False,
                     method: str = DEFAULT_METHOD,
                     cap: Optional[float] = DEFAULT_ACT_CAP,
                     low_bits: int = DEFAULT_LOW_BITS) -> float:
    """The calibrated activation range ``r`` of one layer.

    ``min(cap, max|x|, threshold)`` when ``bits < low_bits`` (threshold by
    ``method``), else ``min(cap, max|x|)``; ``cap=None`` means no cap.
    """
    _check_method(method)
    value = float(max_value)
    if bits < low_bits and method != 'max':
        value = min(
            value,
            histogram_threshold(hist, max_value, method, bits, signed=signed))
    if cap is not None:
        value = min(value, float(cap))
    return value


def weight_calibration(weight: Tensor,
                       bits: int,
                       method: str = DEFAULT_METHOD,
                       low_bits: int = DEFAULT_LOW_BITS,
                       bins: int = DEFAULT_BINS,
                       per_channel: bool = False) -> Optional[Tensor]:
    """The calibrated weight threshold ``T`` of one layer.

    Returns:
        Tensor | None: ``None`` means ``max|W|`` (the layer keeps computing
        it from its current weights) -- for ``bits >= low_bits``, FP
        weights and ``method='max'``. Otherwise a 0-d tensor, or one value
        per output channel when ``per_channel``.
    """
    _check_method(method)
    if bits == FP_BITS or bits >= low_bits or method == 'max':
        return None
    w = weight.detach().float().cpu()
    rows = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    out = []
    for row in rows:
        top = float(row.abs().max())
        hist = magnitude_histogram(row, top, bins, signed=True)
        out.append(
            histogram_threshold(hist, top, method, bits, for_weight=True))
    t = torch.tensor(out, dtype=weight.dtype)
    return t if per_channel else t.reshape(())


# ---------------------------------------------------------------------------
# Statistics of a network
# ---------------------------------------------------------------------------
def quantized_layers(model: nn.Module) -> 'OrderedDict[str, nn.Module]':
    """The fixed-bit layers of ``model`` by name, network order."""
    return OrderedDict((name, m) for name, m in model.named_modules()
                       if is_quantized_layer(m))


def _float_forward_fn(module: nn.Module) -> Callable:
    if isinstance(module, nn.Conv2d):
        return lambda x: module._conv_forward(x, module.weight, module.bias)
    return lambda x: F.linear(x, module.weight, module.bias)


@contextlib.contextmanager
def float_forward(model: nn.Module) -> Iterator[nn.Module]:
    """Run the fixed-bit layers of ``model`` unquantized inside the block.

    Each layer's ``forward`` is shadowed by the plain conv / linear on its
    own (shared) parameters; nothing else changes and it is undone on exit.
    """
    patched = []
    try:
        for module in quantized_layers(model).values():
            module.forward = _float_forward_fn(module)
            patched.append(module)
        yield model
    finally:
        for module in patched:
            del module.forward


ReduceFn = Callable[[Tensor], Tensor]


def collect_activation_stats(
        model: nn.Module,
        batches: Sequence,
        forward: Optional[Callable] = None,
        bins: int = DEFAULT_BINS,
        names: Optional[Sequence[str]] = None,
        reduce_max: Optional[ReduceFn] = None,
        reduce_sum: Optional[ReduceFn] = None) -> Dict[str, dict]:
    """Input statistics of the quantized layers of the FP network.

    Two passes over ``batches`` (eval mode, no grad, quantizers off): the
    maximum magnitude of each layer's input, then its histogram over
    ``[0, max]``.

    Args:
        model: The network.
        batches: Inputs for ``forward`` (kept, so both passes see the same).
        forward: ``forward(model, batch)``; default ``model(batch)``.
        bins: Histogram bins.
        names: Layers to observe; default every quantized layer whose
            activations are quantized (``a_bits < 32``).
        reduce_max / reduce_sum: In-place all-reduce of a tensor across
            processes (None: single process). Applied to all layers'
            statistics at once, so every process ends with the same ones.

    Returns:
        dict: ``name -> {'max': float, 'hist': Tensor(bins), 'count': int,
        'signed': bool}``.
    """
    layers = quantized_layers(model)
    if names is None:
        names = [n for n, m in layers.items() if m.a_bits != FP_BITS]
    names = list(names)
    if not names:
        return {}
    batches = list(batches)
    if not batches:
        raise ValueError('calibration needs at least one batch')
    forward = forward or (lambda m, b: m(b))
    signed = {n: bool(layers[n].signed) for n in names}
    maxima = torch.zeros(len(names), dtype=torch.float64)
    hists = torch.zeros(len(names), bins, dtype=torch.float64)
    state = {'pass': 'max'}

    def make_hook(i, name):

        def hook(module, args):
            x = args[0]
            if state['pass'] == 'max':
                mag = _magnitudes(x, signed[name])
                if mag.numel():
                    maxima[i] = max(float(maxima[i]), float(mag.max()))
            else:
                hists[i] += magnitude_histogram(x, float(maxima[i]), bins,
                                                signed[name])

        return hook

    handles = [
        layers[name].register_forward_pre_hook(make_hook(i, name))
        for i, name in enumerate(names)
    ]
    try:
        with eval_mode(model), float_forward(model):
            for batch in batches:
                forward(model, batch)
            if reduce_max is not None:
                reduce_max(maxima)
            state['pass'] = 'hist'
            for batch in batches:
                forward(model, batch)
            if reduce_sum is not None:
                reduce_sum(hists)
    finally:
        for handle in handles:
            handle.remove()
    return {
        name:
        dict(
            max=float(maxima[i]),
            hist=hists[i].clone(),
            count=int(hists[i].sum()),
            signed=signed[name])
        for i, name in enumerate(names)
    }


def calibrate_model(model: nn.Module,
                    batches: Iterable,
                    forward: Optional[Callable] = None,
                    method: str = DEFAULT_METHOD,
                    act_cap: Optional[float] = DEFAULT_ACT_CAP,
                    low_bits: int = DEFAULT_LOW_BITS,
                    bins: int = DEFAULT_BINS,
                    weights: bool = True,
                    activations: bool = True,
                    weight_method: Optional[str] = None,
                    reduce_max: Optional[ReduceFn] = None,
                    reduce_sum: Optional[ReduceFn] = None) -> Dict[str, dict]:
    """Calibrate every fixed-bit layer of ``model`` in place.

    Activation ranges from the inputs seen on ``batches`` (see
    :func:`activation_range`), weight thresholds from the weights (see
    :func:`weight_calibration`). The training flags of the modules are
    restored; only ``act_range`` and ``w_threshold`` change.

    Args:
        model: A network with ``QuantizedConv2d`` / ``QuantizedLinear``.
        batches: Inputs for ``forward``.
        forward: ``forward(model, batch)``; default ``model(batch)``.
        method: ``'release'`` (the released code's rule, default), ``'kl'``, ``'mse'`` or
            ``'max'`` (see the module doc).
        act_cap: Upper bound of activation ranges (6.0; None: none).
        low_bits: Widths below it use ``method``; the rest use the max.
        bins: Histogram bins.
        weights / activations: What to calibrate.
        weight_method: Another method for the weights (default ``method``).
        reduce_max / reduce_sum: See :func:`collect_activation_stats`.

    Returns:
        dict: ``name -> {'w_bits', 'a_bits', 'signed', 'act_max',
        'act_range', 'w_max', 'w_threshold'}`` (``w_threshold`` None: the
        layer keeps ``max|W|``; ``act_range`` None: not calibrated).

    Example:
        >>> from torch import nn
        >>> from gmpq_mm.quantization.convert import to_quantized
        >>> net = to_quantized(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(),
        ...                                  nn.Conv2d(8, 8, 3)), (4, 4))
        >>> batches = [torch.rand(2, 3, 8, 8) for _ in range(2)]
        >>> stats = calibrate_model(net, batches, method='max')
        >>> act_range = float(net[2].act_range.detach())
        >>> list(stats), act_range == stats['2']['act_range']
        (['2'], True)
    """
    _check_method(method)
    weight_method = _check_method(weight_method or method)
    layers = quantized_layers(model)
    stats = {}
    if activations:
        stats = collect_activation_stats(
            model,
            batches,
            forward,
            bins,
            reduce_max=reduce_max,
            reduce_sum=reduce_sum)
    results = OrderedDict()
    for name, module in layers.items():
        w_bits, a_bits = module.bits
        row = dict(
            w_bits=w_bits,
            a_bits=a_bits,
            signed=bool(module.signed),
            act_max=None,
            act_range=None,
            w_max=None,
            w_threshold=None)
        if name in stats:
            st = stats[name]
            r = activation_range(st['hist'], st['max'], a_bits, module.signed,
                                 method, act_cap, low_bits)
            if r <= 0:  # a dead input: keep any positive range
                r = float(act_cap) if act_cap is not None else 1.0
            module.calibrate_activation(r)
            row.update(
                act_max=st['max'], act_range=float(module.act_range.detach()))
        if weights and w_bits != FP_BITS:
            t = weight_calibration(module.weight, w_bits, weight_method,
                                   low_bits, bins, module.per_channel)
            module.calibrate_weight(t)
            with torch.no_grad():
                current = current_weight_threshold(module.weight,
                                                   module.w_threshold,
                                                   module.per_channel)
                row['w_max'] = float(module.weight.detach().abs().max())
            row['w_threshold'] = (None if t is None else
                                  [float(v) for v in current.reshape(-1)])
        results[name] = row
    return results
