"""Make a resumed run repeat the uninterrupted one bit for bit.

Two random states are not in an mmengine checkpoint: the one the data
augmentation draws from (the loading process's), and the main process's
own (dropout, anything a model or hook draws). The first is taken care of
by :mod:`gmpq_mm.datasets.sample_seeding` (every sample under a state of
its own); :class:`ExactResumeHook` takes care of the second and of
resuming in the middle of an epoch:

* before every training iteration, ``random``, ``numpy`` and torch (every
  device) are seeded from ``(seed, iteration)``, so what the iteration
  draws depends on nothing before it;
* a run resumed from a checkpoint written mid-epoch skips the samples the
  epoch had already trained on (mmengine's epoch loop would start the
  epoch over).

:func:`add_exact_resume` puts both into a config; ``tools/train.py`` calls
it for every run.
"""
import random

import numpy as np
import torch
from mmengine.hooks import Hook

from gmpq_mm.datasets.sample_seeding import (EpochTaggedSampler, sample_seed,
                                             seed_every_sample)
from gmpq_mm.registry import HOOKS
from gmpq_mm.utils.cli import add_custom_hook

__all__ = ['ExactResumeHook', 'add_exact_resume', 'resume_position']

# keeps the main process's seeds apart from the samples' seeds
_MAIN = 0x6D61696E


def resume_position(done: int, length: int) -> tuple:
    """``(passes, batches)`` of a loader of ``length`` batches (restarted
    whenever it runs out) after ``done`` batches."""
    return divmod(int(done), max(int(length), 1))


def skip_done_batches(loader, done: int) -> bool:
    """Make ``loader``'s next pass of this epoch leave out its first
    ``done`` batches (wrapping round a shorter loader); False when its
    sampler cannot (then nothing is skipped)."""
    sampler = getattr(loader, 'sampler', None)
    if not isinstance(sampler, EpochTaggedSampler) or done <= 0:
        return False
    passes, batches = resume_position(done, len(loader))
    sampler.skip_next(batches * loader.batch_size, passes)
    return True


@HOOKS.register_module()
class ExactResumeHook(Hook):
    """Seed the main process per iteration; skip what a resumed epoch has
    already done (see the module docstring)."""

    priority = 'VERY_HIGH'

    def before_train_epoch(self, runner) -> None:
        loader = runner.train_loop.dataloader
        done = runner.iter - runner.epoch * len(loader)
        if 0 < done < len(loader):
            # set_epoch first (DistSamplerSeedHook would reset nothing of
            # ours, but the wrapped sampler must be on this epoch).
            sampler = getattr(loader, 'sampler', None)
            if hasattr(sampler, 'set_epoch'):
                sampler.set_epoch(runner.epoch)
            if skip_done_batches(loader, done):
                runner.logger.info(
                    f'resumed in the middle of epoch {runner.epoch + 1}: '
                    f'skipping the {done} batches it has trained on')

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        # Ranks draw alike unless the config asks them not to.
        rank = runner.rank if runner._randomness_cfg.get(
            'diff_rank_seed', False) else 0
        seed = sample_seed(runner.seed or 0, runner.iter, rank, _MAIN)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


def add_exact_resume(cfg) -> None:
    """Make a run built from ``cfg`` resume exactly: its train dataloader
    seeds every sample (:func:`seed_every_sample`) and
    :class:`ExactResumeHook` is in ``custom_hooks`` (once)."""
    loader = cfg.get('train_dataloader')
    if isinstance(loader, dict):
        cfg.train_dataloader = seed_every_sample(loader)
    add_custom_hook(cfg, 'mmpretrain.ExactResumeHook')
