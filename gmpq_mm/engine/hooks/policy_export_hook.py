"""Write the searched policy into the work_dir as the search goes."""
import os
import os.path as osp
import re

from mmengine.dist import master_only
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from gmpq_mm.quantization.complexity import human_units
from gmpq_mm.quantization.policy import save_policy
from gmpq_mm.registry import HOOKS


def format_policy(policy: dict) -> str:
    """A per-layer bits table and the policy's totals, for the log."""
    rows = [f'{"layer":<28} w_bits a_bits']
    rows += [
        f'{name:<28} {e["w_bits"]:>6} {e["a_bits"]:>6}'
        for name, e in policy['layers'].items()
    ]
    budget = policy.get('budget')
    size, size_budget = policy.get('size_mb'), policy.get('size_budget_mb')
    rows.append(
        f'BitOPs {human_units(policy["bitops"])} (searched layers), mean '
        f'bits w {policy["mean_w_bits"]:.2f} a {policy["mean_a_bits"]:.2f}' +
        (f', budget {human_units(budget)}' if budget else ''))
    if size is not None:
        rows.append(f'size {size:.4f} MB (whole network, searched weights '
                    'packed at their bits)' +
                    (f', budget {size_budget:.4f} MB' if size_budget else ''))
    if policy.get('target') is not None:
        target = policy['target']
        rows.append('target ' +
                    (target if isinstance(target, str) else target['name']))
    return '\n'.join(rows)


@HOOKS.register_module()
class PolicyExportHook(Hook):
    """Save the current policy JSON after every search epoch and at the end.

    Files: ``policy_epoch_{N}.json`` each epoch and ``policy.json`` (the
    final one, what the finetune configs read) in the work_dir. The per-layer
    bits are logged with each file. Only rank 0 writes; the alphas are the
    same on every rank.

    Args:
        interval (int): Epochs between per-epoch files.
        filename (str): Name of the final policy file.
    """

    priority = 'LOW'

    def __init__(self, interval: int = 1, filename: str = 'policy.json'):
        self.interval = interval
        self.filename = filename

    @staticmethod
    def _model(runner):
        model = runner.model
        return model.module if is_model_wrapper(model) else model

    def _export(self, runner, filename, **meta):
        model = self._model(runner)
        policy = model.current_policy(
            source=runner.cfg.filename or 'unknown config', **meta)
        path = osp.join(runner.work_dir, filename)
        save_policy(policy, path)
        runner.logger.info(f'policy written to {path}\n' +
                           format_policy(policy))
        return path

    @master_only
    def before_train(self, runner) -> None:
        """Remove ``policy_epoch_N.json`` files this run will write again
        (``N`` after the epoch it starts from): they belong to an earlier
        run in the same work_dir and must not mix into this run's history
        (``tools/visualization/plot_search_curves.py``)."""
        stale = []
        for name in os.listdir(runner.work_dir):
            match = re.match(r'^policy_epoch_(\d+)\.json$', name)
            if match and int(match.group(1)) > runner.epoch:
                stale.append(osp.join(runner.work_dir, name))
        for path in stale:
            os.remove(path)
        if stale:
            runner.logger.info(
                f'removed {len(stale)} policy_epoch_N.json of an earlier run '
                f'in {runner.work_dir} (epochs after {runner.epoch})')

    @master_only
    def after_train_epoch(self, runner) -> None:
        if self.every_n_epochs(runner, self.interval):
            self._export(
                runner,
                f'policy_epoch_{runner.epoch + 1}.json',
                epoch=runner.epoch + 1)

    @master_only
    def after_train(self, runner) -> None:
        self._export(runner, self.filename, epoch=runner.epoch)
