"""On/off switches read from environment variables, one rule for all.

Every ``GMPQ_MM_*`` switch takes the same words: ``1 / true / yes / on``
(any case) mean on, ``0 / false / no / off`` and the empty string mean off,
and anything else is an error naming the variable -- a typo must not
silently mean "off".
"""
import os
from typing import Optional

__all__ = ['TRUE_WORDS', 'FALSE_WORDS', 'env_flag']

TRUE_WORDS = ('1', 'true', 'yes', 'on')
FALSE_WORDS = ('0', 'false', 'no', 'off', '')


def env_flag(name: str, default: Optional[bool] = False) -> Optional[bool]:
    """The switch ``name`` as a bool; ``default`` when it is not set.

    Args:
        name (str): The environment variable.
        default (bool | None): Returned when ``name`` is unset (None lets a
            caller tell "unset" from "off").

    Raises:
        ValueError: For a value that is neither an on nor an off word.
    """
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise ValueError(f'{name}={raw!r}: use one of {", ".join(TRUE_WORDS)} '
                     f'(on) or {", ".join(FALSE_WORDS[:-1])} (off)')
