"""Store the bit widths in every checkpoint, check them at every load."""
from mmengine.hooks import Hook
from mmengine.runner.checkpoint import find_latest_checkpoint

from gmpq_mm.registry import HOOKS
from gmpq_mm.utils.bit_record import (check_bit_widths, policy_source,
                                      record_bit_widths)


@HOOKS.register_module()
class BitWidthRecordHook(Hook):
    """Record each layer's bit widths into checkpoints the Runner saves, and
    refuse ``load_from`` / ``resume`` checkpoints whose record disagrees
    with the model (see :mod:`gmpq_mm.utils.bit_record`).

    ``tools/train.py`` and ``tools/test.py`` add it to every run.
    """

    priority = 'VERY_HIGH'

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        record_bit_widths(checkpoint, runner.model)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        filename = runner._load_from
        if filename is None and runner._resume:
            filename = find_latest_checkpoint(runner.work_dir)
        check_bit_widths(runner.model, checkpoint, str(filename),
                         policy_source(runner.cfg, 'the config'))
