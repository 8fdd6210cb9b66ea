"""Random augmentation that a resumed run repeats exactly.

A random crop or flip draws from the random state of whichever process
loads the sample: the main process (``num_workers=0``) or a worker, whose
state mmengine seeds once when the worker starts. That state is not in a
checkpoint, so a resumed run drew other crops than the run it continues
(measured: 10 of 19 layers of a search's policy differed), unless the
workers happened to be restarted every epoch.

Here the state is not carried at all: every sample is loaded under a
random state derived from ``(seed, epoch, pass, index)`` alone
(:func:`sample_seed`), so which process loads it, how many workers there
are and whether they persist do not matter, and a run resumed from any
checkpoint draws what the uninterrupted run drew.

* :class:`EpochTaggedSampler` wraps the configured sampler and hands out
  ``(seed, epoch, pass, index)`` keys instead of bare indices (``pass``
  counts restarts of the loader within an epoch, for a loader that is
  iterated more than once per epoch); it can also skip the first samples
  of an epoch, to resume in the middle of one.
* :class:`SeededSamples` wraps the dataset: for such a key it seeds
  ``random``, ``numpy`` and torch's CPU generator, loads ``dataset[index]``
  and puts the process's previous random state back.
* :func:`seed_every_sample` rewrites a dataloader config to use both.
"""
import copy
import random
from typing import Iterator, Optional

import numpy as np
import torch
from mmpretrain.registry import DATA_SAMPLERS
from torch.utils.data import get_worker_info

from gmpq_mm.registry import DATASETS

__all__ = [
    'sample_seed', 'SeededSamples', 'EpochTaggedSampler', 'seed_every_sample',
    'unwrap_seeded'
]

_MASK64 = 0xFFFFFFFFFFFFFFFF


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(*key: int) -> int:
    """A 32-bit seed from integers (``seed, epoch, pass, index`` or any
    other tuple): equal keys give equal seeds, neighbours unrelated ones
    (splitmix64 over the key; a few microseconds)."""
    h = 0
    for k in key:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h & 0xFFFFFFFF


class _SeededRandomState:
    """Seed ``random``, ``numpy`` and torch's CPU generator; with
    ``restore``, put the states they had back on exit (numpy's costs about
    0.2 ms, so only the main process does it: a worker's own state is
    reseeded for every sample anyway)."""

    def __init__(self, seed: int, restore: bool = True):
        self.seed, self.restore = seed, restore

    def __enter__(self):
        if self.restore:
            self.saved = (random.getstate(), np.random.get_state(),
                          torch.random.default_generator.get_state())
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.random.default_generator.manual_seed(self.seed)

    def __exit__(self, *exc):
        if self.restore:
            py, np_state, torch_state = self.saved
            random.setstate(py)
            np.random.set_state(np_state)
            torch.random.default_generator.set_state(torch_state)
        return False


@DATASETS.register_module()
class SeededSamples:
    """A dataset whose samples load under a random state of their own.

    Args:
        dataset (dict | Dataset): The dataset (a config is built).
        lazy_init (bool): Leave ``full_init`` to the caller (as mmengine's
            datasets do).

    Indexed by an ``int`` it is the wrapped dataset; indexed by a key of
    :class:`EpochTaggedSampler` ``(seed, epoch, pass, index)`` it returns
    ``dataset[index]`` loaded under :func:`sample_seed` of the key.
    Attributes it lacks (``metainfo``, ``get_subset`` ...) are the wrapped
    dataset's, except special ``__names__`` (a copy stays a wrapper).
    """

    def __init__(self, dataset, lazy_init: bool = False):
        if isinstance(dataset, dict):
            dataset = DATASETS.build(dataset)
        self.dataset = dataset
        if not lazy_init and hasattr(dataset, 'full_init'):
            dataset.full_init()

    def full_init(self):
        """Initialise the wrapped dataset (mmengine's lazy-init protocol)."""
        if hasattr(self.dataset, 'full_init'):
            self.dataset.full_init()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            in_worker = get_worker_info() is not None
            with _SeededRandomState(sample_seed(*key), not in_worker):
                return self.dataset[key[-1]]
        return self.dataset[key]

    def __getattr__(self, name):
        # 'dataset' is not set yet while unpickling (no recursion); special
        # names are not forwarded: copy.deepcopy looks up __deepcopy__ on
        # the instance, and the wrapped dataset's would copy the dataset
        # alone, silently dropping the per-sample seeding.
        if name == 'dataset' or (name.startswith('__')
                                 and name.endswith('__')):
            raise AttributeError(
                f'{type(self).__name__!r} object has no attribute {name!r}')
        return getattr(self.dataset, name)


@DATA_SAMPLERS.register_module()
class EpochTaggedSampler:
    """Hands out ``(seed, epoch, pass, index)`` keys for
    :class:`SeededSamples`, in the order of the wrapped sampler.

    Args:
        dataset: The dataset (given by mmengine's ``build_dataloader``).
        sampler (dict): The sampler to wrap (``DefaultSampler`` ...), built
            with the same ``dataset`` and ``seed``.
        seed (int, optional): The run's seed (given by mmengine); the
            wrapped sampler's own ``seed`` is used when it has one, so the
            keys follow the seed its order follows.
    """

    def __init__(self, dataset, sampler: dict, seed: Optional[int] = None):
        self.sampler = DATA_SAMPLERS.build(
            sampler, default_args=dict(dataset=dataset, seed=seed))
        own = getattr(self.sampler, 'seed', None)
        self.seed = int(own if own is not None else (seed or 0))
        self.epoch = 0
        self._pass = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (also of the wrapped sampler)."""
        self.epoch = epoch
        self._pass = 0
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)

    def skip_next(self, count: int, passes: int = 0) -> None:
        """Leave out the first ``count`` samples of the next pass and count
        it as pass number ``passes`` of the epoch: a run resumed in the
        middle of an epoch continues where it stopped. Call it after
        :meth:`set_epoch`."""
        self._skip = int(count)
        self._pass = int(passes)

    def __iter__(self) -> Iterator[tuple]:
        tag = (self.seed, self.epoch, self._pass)
        self._pass += 1
        skip, self._skip = self._skip, 0
        for i, index in enumerate(self.sampler):
            if i >= skip:
                yield tag + (int(index), )

    def __len__(self) -> int:
        return len(self.sampler)


def unwrap_seeded(dataset):
    """The dataset inside :class:`SeededSamples` (a config or an object),
    or ``dataset`` itself."""
    if isinstance(dataset, SeededSamples):
        return dataset.dataset
    if isinstance(dataset, dict) and str(dataset.get(
            'type', '')).endswith('SeededSamples'):
        return dataset['dataset']
    return dataset


def seed_every_sample(loader_cfg: dict) -> dict:
    """A copy of a dataloader config whose samples load under their own
    random state (see the module docstring). Applying it again re-wraps
    the same sampler and dataset (so a caller may replace the dataset in
    between); a config with a ``batch_sampler``, an infinite sampler or
    without a ``sampler`` dict is returned as it is."""
    loader_cfg = copy.copy(loader_cfg)
    sampler = loader_cfg.get('sampler')
    if not isinstance(sampler, dict) or loader_cfg.get('batch_sampler'):
        return loader_cfg
    if str(sampler.get('type', '')).endswith('EpochTaggedSampler'):
        sampler = sampler['sampler']
    if 'Infinite' in str(sampler.get('type', '')):
        # No epochs to tag (iteration-based loops): left as it is.
        return loader_cfg
    loader_cfg['sampler'] = dict(
        type='mmpretrain.EpochTaggedSampler', sampler=copy.copy(sampler))
    dataset = unwrap_seeded(loader_cfg['dataset'])
    if isinstance(dataset, dict):
        dataset = dict(type='mmpretrain.SeededSamples', dataset=dataset)
    else:
        dataset = SeededSamples(dataset)
    loader_cfg['dataset'] = dataset
    return loader_cfg
