"""Deployment targets: which bit widths a runtime executes, holds or refuses.

A search is only worth its BitOPs where the deployed runtime has kernels
for the widths it picks. A :class:`Target` names, for weights and
activations separately,

* the **native** widths: those the runtime stores and executes as such
  (an int8 kernel for 8 bits, packed int4 weights for 4 bits, ...). A
  preset's search candidates are its native widths;
* the **held** widths: those it can still represent, in a wider container
  (a 3-bit code in an int8 tensor): the network computes what the policy
  says, but runs and stores like the container's width. Such a layer is
  *emulated*;
* everything else it cannot hold: a policy using it is refused.

``docs/user_guides/budgets_and_targets.md`` has the table of presets and the
runtime documentation each row rests on. Use one in a search config with
``model = dict(target='int8_runtime')``.

Pure Python: nothing from mmengine / mmpretrain is imported.
"""
from collections import OrderedDict
from typing import Dict, Mapping, NamedTuple, Tuple, Union

from .bits import FP_BITS, check_candidates

__all__ = [
    'Target', 'TargetError', 'TARGETS', 'get_target', 'emulated_layers',
    'check_policy_target', 'describe_emulated', 'with_target_candidates'
]

Bits = Tuple[int, int]
_INT = (2, 3, 4, 5, 6, 7, 8)


class TargetError(ValueError):
    """A target that does not exist, or a policy it cannot hold."""


class Target(NamedTuple):
    """Bit widths of one deployment target (see the module notes).

    ``w_bits`` / ``a_bits`` are the native widths (the search candidates);
    ``w_held`` / ``a_held`` every width it can represent, native ones
    included.
    """
    name: str
    w_bits: Tuple[int, ...]
    a_bits: Tuple[int, ...]
    w_held: Tuple[int, ...]
    a_held: Tuple[int, ...]
    description: str = ''


TARGETS: Dict[str, Target] = OrderedDict((t.name, t) for t in [
    Target(
        'int8_runtime',
        w_bits=(4, 8),
        a_bits=(8, ),
        # every code up to 8 bits fits the int8 tensors; float layers
        # run as float
        w_held=_INT + (FP_BITS, ),
        a_held=_INT + (FP_BITS, ),
        description='onnxruntime CPU (QLinearConv / QDQ int8) and '
        'TensorRT INT8: int8 activations and weights; 4-bit weights '
        'stored as int4 (TensorRT weight-only INT4, ONNX INT4 '
        'DequantizeLinear) and computed at 8 bits'),
    Target(
        'int4_tensorcore',
        w_bits=(4, 8),
        a_bits=(4, 8),
        w_held=_INT,
        a_held=_INT,
        description='NVIDIA Turing / Ampere integer tensor cores '
        '(CUTLASS s4 / s8 GEMM and implicit-GEMM conv): int4 and int8 '
        'operands; no float inside a quantized layer'),
    Target(
        'subbyte_accel',
        w_bits=(2, 3, 4, 6),
        a_bits=(2, 3, 4, 6),
        w_held=_INT,
        a_held=_INT,
        description='bit-serial / bit-flexible accelerators and '
        'kernels (e.g. TVM bit-serial conv, BitFusion-style arrays): '
        'any width up to 8, the cost scaling with w x a bits; the '
        "GMPQ paper's search space"),
])


def get_target(target: Union[str, Mapping, Target],
               where: str = 'target') -> Target:
    """A :class:`Target` from a preset name or a dict.

    Args:
        target: A name in :data:`TARGETS`, a :class:`Target`, or a dict with
            ``name``, ``w_bits``, ``a_bits`` and optionally ``w_held`` /
            ``a_held`` (default: the native widths only), for a runtime that
            has no preset.
        where: The config field, for error messages.

    Raises:
        TargetError: Naming ``where`` and the known presets.

    Example:
        >>> get_target('int8_runtime').a_bits
        (8,)
        >>> get_target('int9')
        Traceback (most recent call last):
        ...
        gmpq_mm.quantization.targets.TargetError: target: unknown target ...
    """
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        if target not in TARGETS:
            raise TargetError(f'{where}: unknown target {target!r}; presets: '
                              f'{", ".join(TARGETS)} (or a dict name, w_bits, '
                              f'a_bits, w_held, a_held)')
        return TARGETS[target]
    if isinstance(target, Mapping):
        unknown = set(target) - set(Target._fields)
        if unknown or not {'name', 'w_bits', 'a_bits'} <= set(target):
            raise TargetError(f'{where}: a target dict needs name, w_bits, '
                              f'a_bits (optional w_held, a_held, '
                              f'description), got keys {sorted(target)}')
        try:
            w = check_candidates(target['w_bits'], f'{where}.w_bits')
            a = check_candidates(target['a_bits'], f'{where}.a_bits')
            w_held = check_candidates(
                target.get('w_held', w), f'{where}.w_held')
            a_held = check_candidates(
                target.get('a_held', a), f'{where}.a_held')
        except ValueError as err:
            raise TargetError(str(err)) from None
        for kind, native, held in (('w', w, w_held), ('a', a, a_held)):
            if not set(native) <= set(held):
                raise TargetError(f'{where}: {kind}_held {list(held)} must '
                                  f'include {kind}_bits {list(native)}')
        return Target(
            str(target['name']), w, a, w_held, a_held,
            str(target.get('description', '')))
    raise TargetError(f'{where}: a target is a preset name or a dict, got '
                      f'{target!r}')


def _layer_bits(policy: Mapping) -> 'OrderedDict[str, Bits]':
    """``name -> (w, a)`` of a policy dict or a plain layer table."""
    layers = policy.get('layers', policy) if 'format' in policy else policy
    out = OrderedDict()
    for name, bits in layers.items():
        if isinstance(bits, Mapping):
            bits = (bits['w_bits'], bits['a_bits'])
        out[name] = (int(bits[0]), int(bits[1]))
    return out


def emulated_layers(policy: Mapping, target: Union[str, Mapping,
                                                   Target]) -> Dict[str, Bits]:
    """Layers of ``policy`` whose widths ``target`` holds but only emulates.

    Args:
        policy: A policy dict, or ``name -> (w_bits, a_bits)``.
        target: As for :func:`get_target`.

    Returns:
        OrderedDict: ``name -> (w_bits, a_bits)`` of the layers with a
        weight or activation width that is not native on the target (in
        policy order; empty when every layer runs natively). Widths the
        target cannot hold at all are left to
        :func:`check_policy_target`; a full-precision width the target
        holds runs as float and is not counted.

    Example:
        >>> emulated_layers({'a': (8, 8), 'b': (3, 8), 'c': (4, 6)},
        ...                 'int8_runtime')
        OrderedDict([('b', (3, 8)), ('c', (4, 6))])
    """
    t = get_target(target)

    def native(bits, cands):
        # a full-precision width the target holds runs as float: native
        return bits in cands or bits == FP_BITS

    return OrderedDict((name, (w, a))
                       for name, (w, a) in _layer_bits(policy).items()
                       if not (native(w, t.w_bits) and native(a, t.a_bits))
                       and w in t.w_held and a in t.a_held)


def check_policy_target(policy: Mapping,
                        target: Union[str, Mapping, Target],
                        where: str = '<policy>') -> Dict[str, Bits]:
    """Refuse a policy with widths ``target`` cannot hold.

    Returns:
        OrderedDict: :func:`emulated_layers` of the policy (for a warning).

    Raises:
        TargetError: One line naming ``where``, the first layer and width
            the target cannot hold, and how many layers do.
    """
    t = get_target(target)
    bad = [(name, kind, bits) for name, (w, a) in _layer_bits(policy).items()
           for kind, bits, held in (('w_bits', w, t.w_held), ('a_bits', a,
                                                              t.a_held))
           if bits not in held]
    if bad:
        name, kind, bits = bad[0]
        held = t.w_held if kind == 'w_bits' else t.a_held
        more = f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''
        raise TargetError(
            f'{where}: layer {name!r} {kind}={bits} cannot be held by target '
            f'{t.name!r} (it holds {kind} in {list(held)}){more}')
    return emulated_layers(policy, t)


def describe_emulated(layers: Mapping, target: Union[str, Mapping,
                                                     Target]) -> str:
    """One line naming the emulated ``layers`` (for a warning)."""
    t = get_target(target)
    names = ', '.join(f'{n} (w{w}a{a})' for n, (w, a) in layers.items())
    return (f'target {t.name!r} only emulates the widths of {len(layers)} '
            f'layer(s) (native: w {list(t.w_bits)}, a {list(t.a_bits)}); '
            f'they run and are stored at a wider width: {names}')


def with_target_candidates(backbone: Mapping, target: Union[str, Mapping,
                                                            Target]):
    """A supernet backbone config searching ``target``'s native widths.

    Args:
        backbone: A ``MixedPrecisionBackbone`` config (``w_bits`` /
            ``a_bits`` are its candidates).
        target: As for :func:`get_target`.

    Returns:
        tuple: The new config (a copy) and a note saying what the target
        replaced (None when the candidates were already its own).
    """
    t = get_target(target)
    backbone = dict(backbone)
    new = dict(w_bits=list(t.w_bits), a_bits=list(t.a_bits))
    old = {k: backbone.get(k) for k in new}
    note = None
    if any(old[k] is not None and list(old[k]) != new[k] for k in new):
        note = (f'target {t.name!r} sets the candidates '
                f'w_bits={new["w_bits"]} a_bits={new["a_bits"]} (the '
                f'backbone config said w_bits={old["w_bits"]} '
                f'a_bits={old["a_bits"]})')
    backbone.update(new)
    return backbone, note
