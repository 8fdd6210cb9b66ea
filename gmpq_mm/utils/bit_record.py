"""The bit widths a network was trained with, stored in its checkpoint.

A quantized network's weights only mean something with the bit widths they
were trained at, but a state dict does not say which those were: a
checkpoint finetuned with policy A loads into a network built with policy B
without a single missing key, and then reports B's BitOPs with a wrong
accuracy. So every checkpoint gmpq_mm writes carries, in
``checkpoint['meta']['gmpq_bit_widths']``, one entry per quantized layer::

    {'layer1.0.conv1': {'w_bits': 4, 'a_bits': 3},                # fixed bits
     'layer1.0.conv2': {'w_candidates': [2, 3, 4, 6],             # searchable
                        'a_candidates': [2, 3, 4, 6],
                        'w_bits': 4, 'a_bits': 2}}                # argmax now

and every load (``load_from`` / ``resume``, ``tools/test.py``, export, the
attribution pictures) compares it with the network it is loaded into:
:func:`check_bit_widths` refuses a disagreement naming the first differing
layer, the checkpoint and the policy file. A checkpoint of a full-precision
network records ``{}`` (an FP initialisation suits any policy); one without
the record at all (written before it existed, or by another tool) loads with
a single warning.
"""
import logging
import os.path as osp
import sys
import warnings
from typing import Optional

from torch import nn

from gmpq_mm.quantization.layers import is_mixed_layer, is_quantized_layer

__all__ = [
    'RECORD_KEY', 'bit_width_record', 'record_bit_widths', 'check_bit_widths',
    'policy_source', 'add_bit_record_hook'
]

RECORD_KEY = 'gmpq_bit_widths'
_warned = set()


def _warn(msg: str) -> None:
    """Into the run's log when mmengine is loaded (a Runner, a tool), else
    a Python warning: this floor never imports mmengine itself."""
    mmengine_logging = sys.modules.get('mmengine.logging')
    if mmengine_logging is not None:
        mmengine_logging.print_log(
            msg, logger='current', level=logging.WARNING)
    else:
        warnings.warn(msg, stacklevel=3)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, 'module', model)


def bit_width_record(model: nn.Module) -> dict:
    """``name -> entry`` (see the module docstring) of every quantized or
    searchable layer of ``model``, in network order (a search model's
    frozen teacher is full precision and never appears)."""
    record = {}
    for name, module in _unwrap(model).named_modules():
        if is_mixed_layer(module):
            w, a = (int(b) for b in module.choice())
            record[name] = {
                'w_candidates': [int(b) for b in module.w_candidates],
                'a_candidates': [int(b) for b in module.a_candidates],
                'w_bits': w,
                'a_bits': a
            }
        elif is_quantized_layer(module):
            w, a = (int(b) for b in module.bits)
            record[name] = {'w_bits': w, 'a_bits': a}
    return record


def record_bit_widths(checkpoint: dict, model: nn.Module) -> dict:
    """Put :func:`bit_width_record` of ``model`` into ``checkpoint['meta']``
    (in place); returns the checkpoint."""
    checkpoint.setdefault('meta', {})[RECORD_KEY] = bit_width_record(model)
    return checkpoint


def _describe(entry) -> str:
    if entry is None:
        return 'full precision (not quantized)'
    if 'w_candidates' in entry:
        return (f"searchable, w candidates {entry['w_candidates']}, "
                f"a candidates {entry['a_candidates']}")
    return f"w_bits={entry['w_bits']} a_bits={entry['a_bits']}"


def _same(saved, built) -> bool:
    if saved is None or built is None:
        return saved is built
    if 'w_candidates' in built or 'w_candidates' in saved:
        # A supernet's weights belong to its candidate sets; the argmax
        # moves during the search and is not part of the contract.
        return all(
            saved.get(k) == built.get(k)
            for k in ('w_candidates', 'a_candidates'))
    return (saved['w_bits'], saved['a_bits']) == \
        (built['w_bits'], built['a_bits'])


def check_bit_widths(model: nn.Module,
                     checkpoint: dict,
                     checkpoint_file: str,
                     policy_file: Optional[str] = None) -> None:
    """Refuse a checkpoint whose recorded bit widths differ from ``model``'s.

    Args:
        model: The built network the checkpoint is loaded into.
        checkpoint: The loaded checkpoint dict.
        checkpoint_file: Its path (for messages).
        policy_file: What decided ``model``'s bits (the policy file, or the
            config of uniform bits), for messages.

    Raises:
        ValueError: Naming the first differing layer (network order of the
            model, then the checkpoint's), both bit widths and both files.
    """
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    saved = meta.get(RECORD_KEY) if isinstance(meta, dict) else None
    built = bit_width_record(model)
    if saved is None:
        if built and checkpoint_file not in _warned:
            _warned.add(checkpoint_file)
            _warn(f'{checkpoint_file} does not record the bit widths it was '
                  'trained with (written before gmpq_mm stored them, or by '
                  'another tool): cannot check that they match '
                  f'{policy_file or "the model"}.')
        return
    if not saved:
        return  # a full-precision checkpoint: a valid start for any bits
    if not isinstance(saved, dict):
        raise ValueError(f'{checkpoint_file}: meta.{RECORD_KEY} must be a '
                         f'dict, got {type(saved).__name__}')
    for name in list(built) + [n for n in saved if n not in built]:
        if not _same(saved.get(name), built.get(name)):
            raise ValueError(
                f'{checkpoint_file} was trained with other bit widths than '
                f'the model built from {policy_file or "the config"}: first '
                f'difference at layer {name!r}: checkpoint '
                f'{_describe(saved.get(name))}, model '
                f'{_describe(built.get(name))}. Use the policy the '
                'checkpoint was trained with.')


def policy_source(cfg, default: Optional[str] = None) -> Optional[str]:
    """The file that decides the bits of ``cfg.model``: a ``policy`` path
    anywhere in it, else the config file itself (``default`` if unnamed)."""

    def find(node):
        if isinstance(node, dict):
            policy = node.get('policy')
            if isinstance(policy, str):
                return policy
            for value in node.values():
                found = find(value)
                if found:
                    return found
        return None

    model = cfg.get('model') if hasattr(cfg, 'get') else None
    found = find(model) if model is not None else None
    if found:
        return osp.abspath(osp.expanduser(found))
    return getattr(cfg, 'filename', None) or default


def add_bit_record_hook(cfg) -> None:
    """Make sure the Runner built from ``cfg`` records and checks bit widths
    (``BitWidthRecordHook`` appended to ``custom_hooks`` unless present)."""
    from gmpq_mm.utils.cli import add_custom_hook
    add_custom_hook(cfg, 'mmpretrain.BitWidthRecordHook')
