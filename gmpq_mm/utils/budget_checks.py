"""Fail fast on a config's budgets and deployment target.

Runs before the Runner is built (``tools/train.py``), so that
``--cfg-options model.target_bitops=abc`` (a string), ``=[1,2]`` (a list) or
``=True`` (read as 1 by ``float()``) is a one-line error naming the field, not
a traceback after the teacher has loaded; and a finetune whose policy holds
widths its recorded target cannot hold stops before any training.
"""
import json
import os.path as osp
import warnings
from typing import Mapping, Optional

from gmpq_mm.quantization.budget import check_budget, check_tolerance
from gmpq_mm.quantization.targets import (check_policy_target,
                                          describe_emulated, get_target)

__all__ = ['BUDGET_FIELDS', 'check_model_budgets', 'policy_target_warning']

# Budget fields of a search model, with an example value for the error.
BUDGET_FIELDS = (('target_bitops', '8.9e9'), ('target_size_mb', '5.5'))


def _model_policy(cfg) -> Optional[object]:
    """The ``model.backbone.policy`` a finetune config names, if any."""
    model = cfg.get('model') or {}
    backbone = model.get('backbone') if isinstance(model, Mapping) else None
    if not isinstance(backbone, Mapping):
        return None
    return backbone.get('policy')


def _read_policy(policy):
    """The policy's layers and target, or None when it cannot be read here
    (a missing or malformed file is reported where it is loaded)."""
    if isinstance(policy, str):
        if not osp.isfile(policy):
            return None
        try:
            with open(policy, encoding='utf-8') as f:
                raw = json.load(f)
        except (OSError, ValueError, RecursionError):
            return None
        where = policy
    elif isinstance(policy, Mapping):
        raw, where = dict(policy), '<policy>'
    else:
        return None
    layers = raw.get('layers') if isinstance(raw, Mapping) else None
    if not isinstance(layers, Mapping) or raw.get('target') is None:
        return None
    try:
        table = {
            n: (int(e['w_bits']), int(e['a_bits']))
            for n, e in layers.items()
        }
    except (TypeError, KeyError, ValueError):
        return None
    return table, raw['target'], where


def check_model_budgets(cfg) -> None:
    """Check ``model.target_bitops`` / ``target_size_mb`` (and their
    ``_tolerance``), ``model.target``, and a finetune policy's target.

    Raises:
        BudgetError / TargetError: One line naming the field, file or layer.
    """
    model = cfg.get('model') or {}
    if not isinstance(model, Mapping):
        return
    for field, example in BUDGET_FIELDS:
        budget = check_budget(model.get(field), f'model.{field}', example)
        check_tolerance(
            model.get(f'{field}_tolerance'), f'model.{field}_tolerance',
            f'model.{field}', budget)
    if model.get('target') is not None:
        get_target(model['target'], 'model.target')
    read = _read_policy(_model_policy(cfg))
    if read is not None:
        table, target, where = read
        check_policy_target(table, get_target(target, f'{where}: target'),
                            where)


def policy_target_warning(cfg) -> Optional[str]:
    """Warn, naming them, about the layers of the config's policy that its
    recorded target only emulates (``tools/deploy/export.py``).

    Returns:
        str | None: The warning's text, or None when there is nothing to
        say (no policy, no target, every layer native).
    """
    read = _read_policy(_model_policy(cfg))
    if read is None:
        return None
    table, target, where = read
    emulated = check_policy_target(table, target, where)
    if not emulated:
        return None
    message = f'{where}: ' + describe_emulated(emulated, target)
    warnings.warn(message)
    return message
