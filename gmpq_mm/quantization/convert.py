"""Swap chosen modules of any ``nn.Module`` for quantized ones, in place.

Everything here is keyed by module name as ``model.named_modules()`` spells
it (``layer1.0.conv1``, ``layer2.0.downsample.0``...), so that the policy file
of a supernet applies to any network that shares those names (e.g. mmpretrain's
``ResNet_CIFAR`` and ``ResNet``).

Pure PyTorch: nothing from mmengine / mmpretrain is imported.
"""
import fnmatch
import warnings
from collections import OrderedDict
from typing import (Callable, Dict, Iterable, List, Mapping, Optional,
                    Sequence, Tuple, Union)

import torch
from torch import nn

from .bits import check_bits
from .complexity import bitops, count_macs
from .layers import (MixedPrecisionConv2d, MixedPrecisionLinear,
                     QuantizedConv2d, QuantizedLinear, is_mixed_layer,
                     is_quantized_layer)
from .policy import make_policy
from .policy import policy_layers as policy_layers_of
from .probe import eval_mode, probe_input

__all__ = [
    'select_layers', 'replace_layers', 'detect_signed_inputs',
    'to_mixed_precision', 'to_quantized', 'policy_from_model'
]

SignedSpec = Union[bool, str, Callable[[str, nn.Module], bool], Mapping[str,
                                                                        bool]]


def _as_patterns(patterns: Optional[Union[str, Iterable[str]]],
                 arg: str) -> List[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    for pat in patterns:
        if not isinstance(pat, str):
            raise TypeError(f'{arg} patterns must be strings, got {pat!r}')
    return patterns


def select_layers(model: nn.Module,
                  include: Optional[Union[str, Sequence[str]]] = None,
                  exclude: Optional[Union[str, Sequence[str]]] = None,
                  types: Tuple[type, ...] = (nn.Conv2d, ),
                  skip_stem: bool = True) -> List[str]:
    """Names of the modules to quantize, in ``named_modules()`` order.

    By default every module of ``types`` is selected except the stem, i.e.
    the first ``nn.Conv2d`` in ``named_modules()`` order (the stem and the
    classifier stay full precision in GMPQ).

    Args:
        model: Any module.
        include: fnmatch-style patterns on module names (``'layer*.conv1'``);
            if given, only matching modules are kept.
        exclude: fnmatch-style patterns; matching modules are dropped.
            ``exclude`` wins over ``include``.
        types: Module types that can be selected.
        skip_stem: Drop the first ``nn.Conv2d`` of the network.

    Returns:
        list[str]: Selected module names.

    Raises:
        ValueError: If a pattern matches no module of ``types`` (a typo must
            not silently select nothing), or if nothing is selected at all.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(),
        ...                     nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                     nn.Conv2d(8, 4, 1))
        >>> select_layers(net)  # every conv but the stem ('0')
        ['2', '4']
        >>> select_layers(net, exclude='4')
        ['2']
    """
    include = _as_patterns(include, 'include')
    exclude = _as_patterns(exclude, 'exclude')
    types = tuple(types)

    typed = [
        name for name, module in model.named_modules()
        if name and isinstance(module, types)
    ]
    stem = None
    if skip_stem:
        stem = next((name for name, module in model.named_modules()
                     if name and isinstance(module, nn.Conv2d)), None)

    # Patterns are checked against every module of ``types`` (stem included),
    # so that excluding the stem explicitly is not an error.
    unmatched = [(arg, pat)
                 for arg, pats in (('include', include), ('exclude', exclude))
                 for pat in pats if not fnmatch.filter(typed, pat)]
    if unmatched:
        listed = ', '.join(f'{arg} {pat!r}' for arg, pat in unmatched)
        type_names = '/'.join(t.__name__ for t in types)
        raise ValueError(
            f'pattern(s) {listed} match no {type_names} module of '
            f'{type(model).__name__}; e.g. {typed[:4]}')

    selected = []
    for name in typed:
        if name == stem:
            continue
        if include and not any(
                fnmatch.fnmatchcase(name, pat) for pat in include):
            continue
        if any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
            continue
        selected.append(name)
    if not selected:
        raise ValueError(
            f'no layer of {type(model).__name__} selected (include='
            f'{include}, exclude={exclude}, skip_stem={skip_stem}, '
            f'stem={stem!r})')
    return selected


def _resolve(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    """Parent module and attribute name of the submodule called ``name``."""
    parent_name, _, attr = name.rpartition('.')
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr


def replace_layers(model: nn.Module, factory: Callable[[str, nn.Module],
                                                       nn.Module],
                   names: Iterable[str]) -> nn.Module:
    """Replace the modules called ``names`` by ``factory(name, module)``.

    The replacement is made in place at the same attribute, so module names
    are preserved; the factory is expected to reuse the module's Parameters
    (``from_float``) so that parameter names and values are preserved too.

    Args:
        model: The module to edit in place.
        factory: ``(name, old_module) -> new_module``.
        names: Names as given by ``model.named_modules()``.

    Returns:
        nn.Module: ``model`` itself.

    Raises:
        ValueError: If a name is not a submodule of ``model`` (all unknown
            names are checked before anything is replaced).
    """
    names = list(dict.fromkeys(names))  # de-duplicate, keep order
    known = dict(model.named_modules())
    unknown = [name for name in names if not name or name not in known]
    if unknown:
        raise ValueError(
            f'unknown module name(s) {unknown} in {type(model).__name__}')
    for name in names:
        parent, attr = _resolve(model, name)
        old = getattr(parent, attr)
        new = factory(name, old)
        if not isinstance(new, nn.Module):
            raise TypeError(f'factory returned {type(new).__name__} for '
                            f'{name!r}, expected an nn.Module')
        setattr(parent, attr, new)
    return model


def detect_signed_inputs(model: nn.Module,
                         names: Sequence[str],
                         input_shape: Sequence[int] = (3, 32, 32),
                         batch_size: int = 2) -> Dict[str, bool]:
    """Whether the input of each named module can be negative.

    One forward pass of a fixed random batch, in eval mode under no_grad
    (the training mode is restored after). Layers fed by a linear
    bottleneck or a residual sum (MobileNetV2) see negative inputs and need
    a signed activation quantizer; layers after a ReLU do not.

    Modules that the forward never calls are reported unsigned, with a
    warning.
    """
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise ValueError(
            f'unknown module name(s) {unknown} in {type(model).__name__}')
    seen: Dict[str, bool] = {}

    def make_hook(name):

        def hook(module, args):
            if args and torch.is_tensor(args[0]):
                negative = bool((args[0] < 0).any())
                seen[name] = seen.get(name, False) or negative

        return hook

    handles = [
        modules[name].register_forward_pre_hook(make_hook(name))
        for name in names
    ]
    try:
        with eval_mode(model):
            model(probe_input(model, input_shape, batch_size, random=True))
    finally:
        for handle in handles:
            handle.remove()
    missed = [name for name in names if name not in seen]
    if missed:
        warnings.warn(f'modules {missed} were not called by the forward '
                      f'pass; treating their inputs as unsigned')
    return {name: seen.get(name, False) for name in names}


def _resolve_signed(model: nn.Module, names: Sequence[str], signed: SignedSpec,
                    input_shape: Sequence[int]) -> Dict[str, bool]:
    """Per-layer ``signed`` flag from the many forms ``signed`` can take."""
    if isinstance(signed, bool):
        return {name: signed for name in names}
    if isinstance(signed, str):
        if signed != 'auto':
            raise ValueError(f"signed must be a bool, 'auto', a callable or "
                             f"a dict name->bool, got {signed!r}")
        return detect_signed_inputs(model, names, input_shape)
    if isinstance(signed, Mapping):
        extra = [name for name in signed if name not in names]
        if extra:
            raise ValueError(f'signed given for unselected layer(s) {extra}')
        return {name: bool(signed.get(name, False)) for name in names}
    if callable(signed):
        modules = dict(model.named_modules())
        return {name: bool(signed(name, modules[name])) for name in names}
    raise TypeError(f'unsupported signed={signed!r}')


def _check_convertible(model: nn.Module, names: Sequence[str]) -> None:
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules or not name]
    if unknown:
        raise ValueError(
            f'unknown module name(s) {unknown} in {type(model).__name__}')
    for name in names:
        module = modules[name]
        if is_mixed_layer(module) or is_quantized_layer(module):
            raise ValueError(f'{name!r} is already a quantized layer '
                             f'({type(module).__name__})')
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise TypeError(f'{name!r} is a {type(module).__name__}; only '
                            f'nn.Conv2d and nn.Linear can be converted')
        if type(module) not in (nn.Conv2d, nn.Linear):
            # A subclass may change the forward (e.g. weight standardisation);
            # the quantized layer only keeps the plain conv / linear maths.
            base = 'Conv2d' if isinstance(module, nn.Conv2d) else 'Linear'
            warnings.warn(f'{name!r} is a {type(module).__name__}; it is '
                          f'converted as a plain nn.{base}')


def to_mixed_precision(model: nn.Module,
                       w_candidates: Sequence[int],
                       a_candidates: Sequence[int],
                       names: Optional[Sequence[str]] = None,
                       signed: SignedSpec = False,
                       input_shape: Sequence[int] = (3, 32, 32),
                       **layer_kw) -> nn.Module:
    """Turn the selected convs / linears of ``model`` into searchable layers.

    Args:
        model: Edited in place.
        w_candidates: Weight bit candidates, e.g. ``(2, 3, 4, 6)``.
        a_candidates: Activation bit candidates.
        names: Modules to convert; default :func:`select_layers` (every
            conv but the stem).
        signed: Signed activation quantizers: a bool for all layers,
            ``'auto'`` (detected by one forward of a random batch of shape
            ``input_shape``), a callable ``(name, module) -> bool`` or a dict
            ``name -> bool`` (missing names are unsigned).
        input_shape: ``(C, H, W)`` of the probe batch for ``signed='auto'``.
        **layer_kw: Passed to ``MixedPrecisionConv2d/Linear.from_float``
            (``init_range``, ``alpha_init``, ``per_channel``).

    Returns:
        nn.Module: ``model`` itself.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(),
        ...                     nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                     nn.Conv2d(8, 4, 1))
        >>> net = to_mixed_precision(net, w_candidates=(2, 4),
        ...                          a_candidates=(2, 4))
        >>> type(net[2]).__name__, net[2].w_candidates, type(net[0]).__name__
        ('MixedPrecisionConv2d', (2, 4), 'Conv2d')
        >>> tuple(net(torch.randn(1, 3, 8, 8)).shape)
        (1, 4, 4, 4)
    """
    names = select_layers(model) if names is None else list(names)
    _check_convertible(model, names)
    signed_of = _resolve_signed(model, names, signed, input_shape)
    w_candidates, a_candidates = tuple(w_candidates), tuple(a_candidates)

    def factory(name, module):
        cls = (
            MixedPrecisionConv2d
            if isinstance(module, nn.Conv2d) else MixedPrecisionLinear)
        return cls.from_float(
            module,
            w_candidates=w_candidates,
            a_candidates=a_candidates,
            signed=signed_of[name],
            layer_name=name,
            **layer_kw)

    return replace_layers(model, factory, names)


def _policy_bits(policy_layers, names: Optional[Sequence[str]],
                 model: nn.Module) -> Dict[str, Tuple[int, int]]:
    """``name -> (w_bits, a_bits)`` from a dict, a policy or a uniform pair."""
    if isinstance(policy_layers, Mapping) and 'format' in policy_layers:
        policy_layers = policy_layers_of(policy_layers)

    if isinstance(policy_layers, Mapping):
        table = {}
        for name, bits in policy_layers.items():
            if isinstance(bits, Mapping):
                bits = (bits['w_bits'], bits['a_bits'])
            w_bits, a_bits = bits
            table[name] = (check_bits(w_bits, where=f'{name} w_bits'),
                           check_bits(a_bits, where=f'{name} a_bits'))
        if names is not None:
            names = list(names)
            missing = [name for name in names if name not in table]
            extra = [name for name in table if name not in names]
            if missing or extra:
                raise ValueError(f'policy and names disagree: missing '
                                 f'{missing}, extra {extra}')
            return {name: table[name] for name in names}
        # Keep network order whatever the order of the dict.
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        unknown = [name for name in table if name not in order]
        if unknown:
            raise ValueError(f'policy names unknown module(s) {unknown} of '
                             f'{type(model).__name__}')
        return dict(sorted(table.items(), key=lambda kv: order[kv[0]]))

    w_bits, a_bits = policy_layers
    w_bits = check_bits(w_bits, where='uniform w_bits')
    a_bits = check_bits(a_bits, where='uniform a_bits')
    names = select_layers(model) if names is None else list(names)
    return {name: (w_bits, a_bits) for name in names}


def to_quantized(model: nn.Module,
                 policy_layers,
                 names: Optional[Sequence[str]] = None,
                 signed: SignedSpec = False,
                 input_shape: Sequence[int] = (3, 32, 32),
                 **layer_kw) -> nn.Module:
    """Turn layers of ``model`` into fixed-bit layers.

    Args:
        model: Edited in place.
        policy_layers: A :class:`~gmpq_mm.quantization.policy.Policy` (or
            a policy dict, as :func:`~gmpq_mm.quantization.policy.make_policy`
            makes), ``name -> (w_bits, a_bits)`` (or ``name -> {'w_bits':
            .., 'a_bits': ..}``), or one ``(w_bits, a_bits)`` pair applied to
            every layer of ``names``.
        names: Layers to convert. Default: the policy's layers, or
            :func:`select_layers` for a uniform pair. With a dict policy the
            names must be exactly the policy's layers.
        signed: As in :func:`to_mixed_precision`.
        input_shape: Probe shape for ``signed='auto'``.
        **layer_kw: Passed to ``QuantizedConv2d/Linear.from_float``.

    Returns:
        nn.Module: ``model`` itself.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(),
        ...                     nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                     nn.Conv2d(8, 4, 1))
        >>> net = to_quantized(net, {'2': (4, 3), '4': (2, 2)})
        >>> net[2].bits, net[4].bits
        ((4, 3), (2, 2))
        >>> uniform = to_quantized(nn.Sequential(nn.Conv2d(3, 8, 3),
        ...                                      nn.Conv2d(8, 8, 3)), (4, 4))
        >>> uniform[1].bits
        (4, 4)
    """
    bits_of = _policy_bits(policy_layers, names, model)
    names = list(bits_of)
    _check_convertible(model, names)
    signed_of = _resolve_signed(model, names, signed, input_shape)

    def factory(name, module):
        cls = (
            QuantizedConv2d
            if isinstance(module, nn.Conv2d) else QuantizedLinear)
        w_bits, a_bits = bits_of[name]
        return cls.from_float(
            module,
            w_bits=w_bits,
            a_bits=a_bits,
            signed=signed_of[name],
            layer_name=name,
            **layer_kw)

    return replace_layers(model, factory, names)


def policy_from_model(model: nn.Module,
                      input_shape: Optional[Sequence[int]] = None,
                      **meta) -> dict:
    """The policy of a supernet (argmax of the alphas) or a quantized net.

    Every mixed-precision layer contributes its ``choice()``, every fixed
    bit layer its ``bits``, keyed by module name in network order.

    Args:
        model: A network holding mixed-precision or quantized layers.
        input_shape: ``(C, H, W)``; if given, ``bitops`` of the policy (over
            its layers, i.e. the searched layers) is measured at this shape.
        **meta: Extra policy fields (``source``, ``budget``, ...).

    Returns:
        dict: The policy.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(),
        ...                     nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                     nn.Conv2d(8, 4, 1))
        >>> net = to_quantized(net, {'2': (4, 3), '4': (2, 2)})
        >>> policy = policy_from_model(net, input_shape=(3, 8, 8))
        >>> policy['layers']['2'], policy['bitops']  # 9216*4*3 + 512*2*2
        ({'w_bits': 4, 'a_bits': 3}, 112640)
    """
    table = OrderedDict()
    w_cands, a_cands = [], []
    for name, module in model.named_modules():
        if is_mixed_layer(module):
            table[name] = tuple(int(b) for b in module.choice())
            w_cands.append(tuple(module.w_candidates))
            a_cands.append(tuple(module.a_candidates))
        elif is_quantized_layer(module):
            table[name] = tuple(int(b) for b in module.bits)
    if not table:
        raise ValueError(f'{type(model).__name__} holds no mixed-precision '
                         f'or quantized layer: no policy to export')

    def common(cands):
        # One list when all searched layers share it (the usual case),
        # otherwise the sorted union.
        if not cands:
            return None
        if all(c == cands[0] for c in cands):
            return list(cands[0])
        return sorted({b for c in cands for b in c})

    meta.setdefault('w_candidates', common(w_cands))
    meta.setdefault('a_candidates', common(a_cands))
    if input_shape is not None:
        macs = count_macs(model, input_shape)
        meta.setdefault('bitops', bitops(macs, table))
        meta['input_shape'] = list(input_shape)
    return make_policy(table, **meta)
