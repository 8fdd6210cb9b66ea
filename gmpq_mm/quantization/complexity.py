"""MACs, BitOPs, model size and compression of (mixed-precision) networks.

Conventions (``docs/method.md``, Complexity and the budget):

* ``MACs`` of a conv: ``C_in / groups * C_out * k_h * k_w * H_out * W_out``;
  of a linear: ``in * out`` times its leading (non-batch) dims. Measured with
  forward hooks on a batch of one at a given input shape, so the spatial
  sizes are the ones the network really produces.
* ``BitOPs = sum_l MACs_l * b_w,l * b_a,l``. Papers count the searched
  (quantized) layers only; the whole-network figure counts the layers kept
  full precision at ``32 x 32``.
* Sizes are in MB of ``1e6`` bytes (FP ResNet-18: 11.69M params * 4 bytes =
  46.8 MB). Conv / linear weights count at their weight bits, packed as the
  artifact stores them (``ceil(numel * bits / 8)`` bytes per layer); every
  other parameter (biases, BatchNorm, activation ranges) at 32 bits; the
  search-only architecture parameters (``alpha_w`` / ``alpha_a``) are not
  counted, and a supernet layer's per-candidate activation ranges count as
  the one range the fixed-bit layer it becomes keeps. Buffers (BatchNorm
  statistics, weight thresholds) are not counted.

Pure PyTorch: nothing from mmengine / mmpretrain is imported.
"""
import math
import numbers
from collections import OrderedDict
from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .layers import is_mixed_layer, is_quantized_layer
from .policy import policy_layers as policy_layers_of
from .probe import eval_mode, probe_input

__all__ = [
    'LayerMacs', 'count_macs', 'bitops', 'expected_bitops',
    'complexity_report', 'format_table', 'human_units', 'MB',
    'weight_size_bits', 'size_terms'
]

MB = 1e6  # bytes per MB in every size this module reports
FP_BITS = 32
# Parameters that only exist for the search and are not part of a model.
_ARCH_PARAM_NAMES = ('alpha_w', 'alpha_a')


class LayerMacs(NamedTuple):
    """MACs of one layer for one sample, its weight (+ bias) count and kind
    (``'conv'`` or ``'linear'``)."""
    macs: int
    params: int
    kind: str


def _macs_of(module: nn.Module, output: Tensor) -> int:
    """MACs of one call of ``module`` for a batch of one."""
    if isinstance(module, _ConvNd):
        # output.numel() = C_out * prod(spatial_out) for a batch of one.
        per_output = (module.in_channels // module.groups) * math.prod(
            module.kernel_size)
        return int(output.numel()) * per_output
    if isinstance(module, nn.Linear):
        # output.numel() = out * prod(leading dims) for a batch of one.
        return int(output.numel()) * module.in_features
    raise TypeError(f'cannot count MACs of {type(module).__name__}')


def _params_of(module: nn.Module) -> int:
    count = module.weight.numel()
    if getattr(module, 'bias', None) is not None:
        count += module.bias.numel()
    return int(count)


def count_macs(
    model: nn.Module,
    input_shape: Sequence[int] = (3, 32, 32),
    types: Tuple[type, ...] = (nn.Conv2d, nn.Linear)
) -> 'OrderedDict[str, LayerMacs]':
    """MACs of every conv / linear layer, measured at ``input_shape``.

    One forward of a batch of one (zeros) in eval mode under no_grad; the
    training mode of every submodule is restored after.

    Args:
        model: Any network whose ``forward`` takes an image batch.
        input_shape: ``(C, H, W)``.
        types: Module types to count (``_ConvNd`` subclasses and
            ``nn.Linear``).

    Returns:
        OrderedDict[str, LayerMacs]: By module name, in ``named_modules()``
        order, for the layers the forward calls. A module called more than
        once has its MACs summed.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(),
        ...                     nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                     nn.Conv2d(8, 4, 1))
        >>> macs = count_macs(net, (3, 8, 8))
        >>> macs['2']  # 8 in x 3x3 kernel x 8 out x 4x4 output
        LayerMacs(macs=9216, params=584, kind='conv')
    """
    found: Dict[str, int] = {}
    handles = []

    def make_hook(name):

        def hook(module, args, output):
            if torch.is_tensor(output):
                found[name] = found.get(name, 0) + _macs_of(module, output)

        return hook

    modules = [(name, m) for name, m in model.named_modules()
               if isinstance(m, tuple(types))]
    for name, module in modules:
        handles.append(module.register_forward_hook(make_hook(name)))
    try:
        with eval_mode(model):
            model(probe_input(model, input_shape, batch_size=1))
    finally:
        for handle in handles:
            handle.remove()
    return OrderedDict(
        (name,
         LayerMacs(found[name], _params_of(module),
                   'conv' if isinstance(module, _ConvNd) else 'linear'))
        for name, module in modules if name in found)


def weight_size_bits(numel: int, w_bits) -> Union[int, float]:
    """Bits ``numel`` weights take at ``w_bits``: packed to whole bytes as
    the artifact stores them (``ceil(numel * w / 8) * 8``), ``numel * 32``
    at full precision, ``numel * w`` for fractional (expected) bits.

    Example:
        >>> weight_size_bits(10, 3), weight_size_bits(10, 32)
        (32, 320)
    """
    if isinstance(w_bits, numbers.Integral) and w_bits < FP_BITS:
        return (int(numel) * int(w_bits) + 7) // 8 * 8
    return int(numel) * w_bits


def _param_count(pname: str, param: Tensor, modules: Mapping) -> int:
    """Values of a parameter as the fixed-bit model keeps it."""
    owner, _, leaf = pname.rpartition('.')
    if leaf == 'act_ranges' and is_mixed_layer(modules.get(owner)):
        return 1  # the fixed-bit layer keeps one range out of K_a
    return int(param.numel())


def size_terms(model: nn.Module,
               layers: Sequence[str]) -> Tuple[int, Dict[str, int]]:
    """The parts of a model's size that do and do not depend on the bits
    of ``layers``.

    Args:
        model: Any network (a supernet counts as the fixed-bit model a
            policy makes of it).
        layers: Names of conv / linear modules whose weight bits vary.

    Returns:
        tuple: ``fixed_bits`` (every other parameter at 32 bits, see the
        module notes) and ``name -> weight numel``; the size of a policy is
        ``fixed_bits + sum weight_size_bits(numel, w_bits)``.
    """
    modules = dict(model.named_modules())
    missing = [n for n in layers if not hasattr(modules.get(n), 'weight')]
    if missing:
        raise ValueError(f'layer(s) {missing} are not weighted modules of '
                         f'{type(model).__name__}')
    varying = {id(modules[n].weight): n for n in layers}
    numels = OrderedDict((n, int(modules[n].weight.numel())) for n in layers)
    fixed, seen = 0, set()
    for pname, param in model.named_parameters():
        if id(param) in seen or pname.rpartition('.')[2] in _ARCH_PARAM_NAMES:
            continue
        seen.add(id(param))
        if id(param) not in varying:
            fixed += _param_count(pname, param, modules) * FP_BITS
    return fixed, numels


def _macs_value(macs: Mapping, name: str) -> int:
    if name not in macs:
        raise ValueError(f'no MACs counted for layer {name!r} (was it called '
                         f'by the forward pass?)')
    value = macs[name]
    return value.macs if isinstance(value, LayerMacs) else value


def bitops(macs: Mapping, layers: Mapping) -> Union[int, float]:
    """``sum_l MACs_l * w_bits_l * a_bits_l`` over ``layers``.

    Args:
        macs: ``name -> LayerMacs`` (as from :func:`count_macs`) or int.
        layers: ``name -> (w_bits, a_bits)``; a uniform ``(w, a)`` pair is
            not accepted here (it would be ambiguous which layers count).

    Returns:
        int: BitOPs (a float if some bits are, e.g. expected bits).

    Example:
        >>> bitops({'a': 100, 'b': 10}, {'a': (4, 3), 'b': (2, 2)})
        1240
    """
    if not isinstance(layers, Mapping):
        raise TypeError(f'layers must be a dict name -> (w_bits, a_bits), '
                        f'got {layers!r}')
    total = 0
    for name, bits in layers.items():
        if isinstance(bits, Mapping):
            bits = (bits['w_bits'], bits['a_bits'])
        w_bits, a_bits = bits
        total += _macs_value(macs, name) * w_bits * a_bits
    return total


def expected_bitops(model: nn.Module,
                    macs: Mapping,
                    normalize: bool = False) -> Tensor:
    """Expected BitOPs of a supernet: ``sum_l MACs_l * E[b_w,l] * E[b_a,l]``.

    Differentiable with respect to the architecture parameters only (MACs
    are constants). With ``normalize=True`` the sum is divided by the MACs of
    the first mixed layer, as the released GMPQ code does so that its ``cd``
    loss weights keep their meaning.

    Returns:
        Tensor: A 0-d tensor.
    """
    total, first = None, None
    for name, module in model.named_modules():
        if not is_mixed_layer(module):
            continue
        layer_macs = _macs_value(macs, name)
        first = layer_macs if first is None else first
        e_w, e_a = module.expected_bits()
        term = e_w * e_a * float(layer_macs)
        total = term if total is None else total + term
    if total is None:
        raise ValueError(f'{type(model).__name__} holds no mixed-precision '
                         f'layer: no expected BitOPs')
    return total / float(first) if normalize else total


def _layer_bits(name: str, module: nn.Module,
                policy: Optional[Mapping]) -> Tuple[float, float, bool]:
    """Bits of one layer and whether it counts as quantized."""
    if policy is not None and name in policy:
        bits = policy[name]
        if isinstance(bits, Mapping):
            bits = (bits['w_bits'], bits['a_bits'])
        return int(bits[0]), int(bits[1]), True
    if is_quantized_layer(module):
        w_bits, a_bits = module.bits
        return int(w_bits), int(a_bits), True
    if is_mixed_layer(module):
        with torch.no_grad():
            e_w, e_a = module.expected_bits()
        return float(e_w), float(e_a), True
    return FP_BITS, FP_BITS, False


def complexity_report(model: nn.Module,
                      input_shape: Sequence[int] = (3, 32, 32),
                      policy_layers: Optional[Mapping] = None) -> dict:
    """Per-layer and total MACs, BitOPs, size and compression.

    Bits of a layer come from, in this order: ``policy_layers`` (if it names
    the layer), a fixed-bit layer's ``bits``, a mixed layer's expected bits
    (floats), else full precision ``(32, 32)``.

    Args:
        model: Any network.
        input_shape: ``(C, H, W)`` the MACs are measured at.
        policy_layers: ``name -> (w_bits, a_bits)``, or a whole policy dict.

    Returns:
        dict: ``'layers'``: rows with ``name, kind, macs, params, w_bits,
        a_bits, bitops, quantized``; ``'totals'``: ``macs`` (every conv /
        linear), ``quantized_macs``, ``bitops_quantized`` (quantized layers
        only: what papers report), ``bitops_total`` (whole network, other
        layers at 32x32), ``fp_bitops_quantized``, ``fp_bitops_total``,
        ``compression`` (whole network, FP / mixed), ``compression_quantized``
        (quantized layers only), ``size_mb``, ``fp_size_mb``,
        ``mean_w_bits`` / ``mean_a_bits`` (plain mean over quantized layers);
        plus ``input_shape`` and ``size_unit``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(),
        ...                     nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                     nn.Conv2d(8, 4, 1))
        >>> bits = {'2': (4, 3), '4': (2, 2)}
        >>> report = complexity_report(net, (3, 8, 8), policy_layers=bits)
        >>> report['totals']['bitops_quantized']  # 9216*4*3 + 512*2*2
        112640
        >>> report['totals']['num_quantized'], report['layers'][0]['w_bits']
        (2, 32)
    """
    if policy_layers is not None and not isinstance(policy_layers, Mapping):
        raise TypeError(f'policy_layers must be a dict name -> (w_bits, '
                        f'a_bits) or a policy, got {policy_layers!r}')
    if policy_layers is not None and 'format' in policy_layers:
        policy_layers = policy_layers_of(policy_layers)
    macs = count_macs(model, input_shape)
    modules = dict(model.named_modules())
    if policy_layers is not None:
        unknown = [name for name in policy_layers if name not in macs]
        if unknown:
            raise ValueError(f'policy layer(s) {unknown} are not conv / '
                             f'linear layers called by '
                             f'{type(model).__name__}')

    rows = []
    weight_bits: Dict[int, float] = {}
    for name, info in macs.items():
        module = modules[name]
        w_bits, a_bits, quantized = _layer_bits(name, module, policy_layers)
        weight_bits[id(module.weight)] = w_bits
        rows.append(
            dict(
                name=name,
                kind=info.kind,
                macs=info.macs,
                params=info.params,
                w_bits=w_bits,
                a_bits=a_bits,
                bitops=info.macs * w_bits * a_bits,
                quantized=quantized))

    size_bits = fp_size_bits = 0
    seen = set()
    for pname, param in model.named_parameters():
        if id(param) in seen or pname.rpartition('.')[2] in _ARCH_PARAM_NAMES:
            continue
        seen.add(id(param))
        count = _param_count(pname, param, modules)
        size_bits += weight_size_bits(count,
                                      weight_bits.get(id(param), FP_BITS))
        fp_size_bits += count * FP_BITS

    total_macs = sum(r['macs'] for r in rows)
    q_rows = [r for r in rows if r['quantized']]
    q_macs = sum(r['macs'] for r in q_rows)
    bitops_q = sum(r['bitops'] for r in q_rows)
    bitops_t = sum(r['bitops'] for r in rows)
    fp_t = total_macs * FP_BITS * FP_BITS
    fp_q = q_macs * FP_BITS * FP_BITS
    totals = dict(
        macs=total_macs,
        quantized_macs=q_macs,
        num_quantized=len(q_rows),
        bitops_quantized=bitops_q,
        bitops_total=bitops_t,
        fp_bitops_quantized=fp_q,
        fp_bitops_total=fp_t,
        compression=fp_t / bitops_t if bitops_t else None,
        compression_quantized=fp_q / bitops_q if bitops_q else None,
        size_mb=size_bits / 8 / MB,
        fp_size_mb=fp_size_bits / 8 / MB,
        mean_w_bits=(sum(r['w_bits']
                         for r in q_rows) / len(q_rows)) if q_rows else None,
        mean_a_bits=(sum(r['a_bits']
                         for r in q_rows) / len(q_rows)) if q_rows else None)
    return dict(
        input_shape=[int(s) for s in input_shape],
        size_unit='MB = 1e6 bytes',
        layers=rows,
        totals=totals)


def human_units(value: Union[int, float], digits: int = 2) -> str:
    """``553648128 -> '553.65M'``; ``1.8e12 -> '1.80T'`` (powers of 1000)."""
    value = float(value)
    for unit, scale in (('T', 1e12), ('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(value) >= scale:
            return f'{value / scale:.{digits}f}{unit}'
    return f'{value:.{digits}f}'.rstrip('0').rstrip('.') or '0'


def _fmt_bits(bits) -> str:
    if isinstance(bits, numbers.Integral):
        return 'fp' if bits == FP_BITS else str(bits)
    return f'{bits:.2f}'


def format_table(report: Mapping) -> str:
    """A plain-text table of a :func:`complexity_report`.

    One row per conv / linear layer (``name``, MACs, weight / activation
    bits, BitOPs; ``fp`` marks 32-bit layers) followed by the totals.
    """
    header = ('layer', 'MACs', 'W', 'A', 'BitOPs')
    body = [(r['name'], human_units(r['macs']), _fmt_bits(r['w_bits']),
             _fmt_bits(r['a_bits']), human_units(r['bitops']))
            for r in report['layers']]
    widths = [
        max(len(str(row[i])) for row in [header] + body)
        for i in range(len(header))
    ]

    def line(row):
        first = str(row[0]).ljust(widths[0])
        rest = [str(c).rjust(w) for c, w in zip(row[1:], widths[1:])]
        return '  '.join([first] + rest)

    sep = '-' * len(line(header))
    t = report['totals']

    def ratio(x):
        return 'n/a' if x is None else f'{x:.2f}x'

    lines = [line(header), sep] + [line(row) for row in body] + [sep]
    lines += [
        f'input shape: {tuple(report["input_shape"])}',
        f'MACs: {human_units(t["macs"])} total, '
        f'{human_units(t["quantized_macs"])} in '
        f'{t["num_quantized"]} quantized layers',
        f'BitOPs (quantized layers): {human_units(t["bitops_quantized"])} '
        f'(FP {human_units(t["fp_bitops_quantized"])}, compression '
        f'{ratio(t["compression_quantized"])})',
        f'BitOPs (whole network, FP layers at 32x32): '
        f'{human_units(t["bitops_total"])} (FP '
        f'{human_units(t["fp_bitops_total"])}, compression '
        f'{ratio(t["compression"])})',
        f'size: {t["size_mb"]:.2f} MB (FP {t["fp_size_mb"]:.2f} MB; '
        f'{report["size_unit"]})',
    ]
    return '\n'.join(lines)
