"""Command-line helpers for the tools: nothing heavy is imported here, so a
tool's ``--help`` and argument errors come back at once."""
import argparse
from contextlib import contextmanager

__all__ = [
    'DictAction', 'fail_in_one_line', 'ONE_LINE_ERRORS', 'add_custom_hook',
    'config_keys_holding', 'register_for_tool', 'add_cfg_options'
]

# Errors whose message says all (what is wrong, where, what to do): the
# tools print them as one line instead of a traceback. Named, not imported,
# so this module stays light (they live in gmpq_mm.compat and
# gmpq_mm.engine.checkpoint_*).
ONE_LINE_ERRORS = ('UnsupportedStackError', 'CheckpointNotTrusted',
                   'CheckpointDownloadError', 'CheckpointWriteError',
                   'UnreadableCheckpoint')


class DictAction(argparse.Action):
    """mmengine's ``DictAction`` (``--cfg-options key=value ...``), imported
    only when the option is given: importing mmengine costs about a second,
    and ``--help`` should not pay it.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> _ = parser.add_argument('--cfg-options', nargs='+',
        ...                         action=DictAction)
        >>> parser.parse_args(['--cfg-options', 'a.b=1', 'c=x,y']).cfg_options
        {'a.b': 1, 'c': ['x', 'y']}
    """

    def __call__(self, parser, namespace, values, option_string=None):
        from mmengine.config import DictAction as MMEngineDictAction
        action = MMEngineDictAction(
            self.option_strings, self.dest, nargs=self.nargs)
        action(parser, namespace, values, option_string)


def add_custom_hook(cfg, hook_type: str) -> None:
    """Append ``dict(type=hook_type)`` to ``cfg.custom_hooks`` unless a hook
    of that type (scope prefix or not) is there already."""
    name = hook_type.split('.')[-1]
    hooks = list(cfg.get('custom_hooks') or [])
    if not any(
            str(h.get('type', '')).split('.')[-1] == name
            for h in hooks if isinstance(h, dict)):
        hooks.append(dict(type=hook_type))
    cfg.custom_hooks = hooks


def config_keys_holding(cfg, value) -> list:
    """Dotted keys of ``cfg`` (nested dicts / lists) whose value is
    ``value``, e.g. ``['model.backbone.backbone.init_cfg.checkpoint']``."""
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            for key, sub in node.items():
                walk(sub, f'{where}.{key}' if where else str(key))
        elif isinstance(node, (list, tuple)):
            for i, sub in enumerate(node):
                walk(sub, f'{where}[{i}]')
        elif isinstance(node, str) and node == value:
            found.append(where)

    walk(cfg, '')
    return found


def _one_line(err, cfg) -> str:
    msg = ' '.join(str(err).split())
    if type(err).__name__ == 'CheckpointDownloadError' and cfg is not None:
        url = next((w for w in msg.split() if '://' in w), '')
        keys = config_keys_holding(
            cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg,
            url) if url else []
        if keys:
            msg = msg.replace('KEY=', f'{keys[0]}=') + \
                f' (the config names it at {", ".join(keys)})'
    return f'error: {msg}'


@contextmanager
def fail_in_one_line(cfg=None):
    """Turn the errors of :data:`ONE_LINE_ERRORS` raised inside into
    ``SystemExit('error: ...')``: one line, no traceback. With ``cfg``, a
    failed download also names the config key holding the URL."""
    try:
        yield
    except Exception as err:
        if not any(k.__name__ in ONE_LINE_ERRORS for k in type(err).__mro__):
            raise
        raise SystemExit(_one_line(err, cfg)) from None


def register_for_tool() -> None:
    """:func:`gmpq_mm.utils.register_all_modules` for a command-line tool:
    an unsupported stack (or another error of :data:`ONE_LINE_ERRORS`)
    ends the tool in one line instead of a traceback."""
    from gmpq_mm.utils import register_all_modules
    with fail_in_one_line():
        register_all_modules()


def add_cfg_options(parser: argparse.ArgumentParser) -> None:
    """The ``--cfg-options key=value ...`` option every config tool takes
    (mmengine's syntax, parsed by :class:`DictAction`)."""
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value (xxx=yyy format)')
