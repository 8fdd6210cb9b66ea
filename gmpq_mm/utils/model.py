"""Two helpers the engine, the models and the reports share: the module
inside a (distributed) wrapper, and whether a checkpoint fits a module.

Plain PyTorch. Not re-exported by :mod:`gmpq_mm.utils`, whose import must
stay free of torch (the tools import it before parsing their arguments).
"""
from typing import Iterable, List, Mapping

from torch import nn

__all__ = ['unwrap_model', 'state_dict_mismatch']


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside DDP / DataParallel / MMDistributedDataParallel
    (any number of wrappers), or ``model`` itself.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> wrapped = nn.DataParallel(nn.DataParallel(net))
        >>> unwrap_model(wrapped) is net, unwrap_model(net) is net
        (True, True)
    """
    while isinstance(getattr(model, 'module', None), nn.Module):
        model = model.module
    return model


def _head(items: List[str], count: int = 3) -> str:
    more = f' ... ({len(items)} in all)' if len(items) > count else ''
    return f'{items[:count]}{more}'


def state_dict_mismatch(
        state: Mapping,
        expected: Mapping,
        optional: Iterable[str] = (),
) -> List[str]:
    """What keeps ``state`` (a checkpoint's) from loading strictly where
    ``expected`` (a module's ``state_dict()``) is: one phrase per kind of
    problem, an empty list if it fits.

    Args:
        state: Names to tensors, from the checkpoint.
        expected: Names to tensors, from the module.
        optional: Name endings that ``state`` may lack (e.g. quantizer
            state that a full-precision checkpoint cannot have).

    Returns:
        list[str]: e.g. ``['2 missing keys, e.g. [...]', 'shape mismatch
        (checkpoint vs model): [...]']``.

    Example:
        >>> ckpt = nn.Linear(3, 2).state_dict()
        >>> state_dict_mismatch(ckpt, nn.Linear(3, 2).state_dict())
        []
        >>> state_dict_mismatch(ckpt, nn.Linear(4, 2).state_dict())
        ["shape mismatch (checkpoint vs model): ['weight (2, 3) vs (2, 4)']"]
        >>> state_dict_mismatch({}, {'w': 1, 'a.act_range': 2},
        ...                     optional=['act_range'])
        ["1 missing keys, e.g. ['w']"]
    """
    optional = tuple(optional)
    missing = [
        k for k in expected
        if k not in state and not (optional and k.endswith(optional))
    ]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f'{k} {tuple(state[k].shape)} vs {tuple(v.shape)}'
        for k, v in expected.items()
        if k in state and hasattr(state[k], 'shape') and hasattr(v, 'shape')
        and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f'{len(missing)} missing keys, e.g. {_head(missing)}')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected keys, e.g. '
                        f'{_head(unexpected)}')
    if shapes:
        problems.append(f'shape mismatch (checkpoint vs model): '
                        f'{_head(shapes)}')
    return problems
