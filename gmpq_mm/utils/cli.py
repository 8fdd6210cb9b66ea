"""Command-line helpers for the tools: nothing heavy is imported here, so a
tool's ``--help`` and argument errors come back at once."""
import argparse

__all__ = ['DictAction']


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
