# Copyright (c) gmpq_mm contributors. All rights reserved.
"""Bit widths: which ones are supported, and how many levels each has.

Pure Python: every other file of the floor checks its bit widths here.
"""
import numbers
from collections.abc import Iterable
from typing import Tuple

FP_BITS = 32
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 32)

__all__ = [
    'FP_BITS', 'SUPPORTED_BITS', 'check_bits', 'check_candidates',
    'activation_levels', 'weight_levels'
]


def check_bits(bits, where: str = '') -> int:
    """Validate one bit width.

    Args:
        bits: The bit width. A Python integer (``bool`` excluded) in 2..8,
            or 32 for full precision.
        where (str): Where the value comes from (e.g. a layer name such as
            ``'layer1.0.conv1'``), put in front of the error message.

    Returns:
        int: ``bits`` as a plain ``int``.

    Raises:
        ValueError: If ``bits`` is not supported.
    """
    ok = (
        isinstance(bits, numbers.Integral) and not isinstance(bits, bool)
        and int(bits) in SUPPORTED_BITS)
    if not ok:
        prefix = f'{where}: ' if where else ''
        raise ValueError(f'{prefix}bit width {bits!r} is not supported; use '
                         f'an int in 2..8, or {FP_BITS} for full precision')
    return int(bits)


def check_candidates(cands: Iterable, where: str = '') -> Tuple[int, ...]:
    """Validate a list of candidate bit widths of one searched layer.

    The order is kept as given, since the architecture parameters are
    indexed by it.

    Args:
        cands (Iterable[int]): The candidate bit widths.
        where (str): Where they come from, for error messages.

    Returns:
        tuple[int]: The candidates as a tuple of ``int``.

    Raises:
        ValueError: If the list is empty, not a sequence of ints, holds an
            unsupported width or a duplicate.
    """
    prefix = f'{where}: ' if where else ''
    if isinstance(cands, (str, bytes)) or not isinstance(cands, Iterable):
        raise ValueError(f'{prefix}bit candidates must be a sequence of ints, '
                         f'got {cands!r}')
    cands = tuple(cands)
    if len(cands) == 0:
        raise ValueError(f'{prefix}bit candidates must not be empty')
    checked = tuple(check_bits(b, where) for b in cands)
    if len(set(checked)) != len(checked):
        raise ValueError(f'{prefix}bit candidates {cands!r} hold duplicates')
    return checked


def activation_levels(bits: int, signed: bool = False) -> int:
    """Number of positive quantization steps ``n`` of an activation.

    ``s = r / n``: ``n = 2^b - 1`` unsigned, ``2^(b-1) - 1`` signed.
    """
    return 2**(bits - 1) - 1 if signed else 2**bits - 1


def weight_levels(bits: int) -> int:
    """Number of positive weight levels ``n = 2^(b-1) - 1`` (``s = T / n``)."""
    return 2**(bits - 1) - 1
