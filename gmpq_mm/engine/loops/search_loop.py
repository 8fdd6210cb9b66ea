"""The GMPQ search loop: bilevel (first-order DARTS) or single-level."""
import contextlib
import copy
from typing import Dict, Optional, Union

import torch
import torch.distributed as torch_dist
from mmengine.dataset import BaseDataset
from mmengine.optim import AmpOptimWrapper, OptimWrapperDict
from mmengine.runner import EpochBasedTrainLoop
from torch.utils.data import DataLoader, Subset

from gmpq_mm.datasets.sample_seeding import seed_every_sample, unwrap_seeded
from gmpq_mm.engine.hooks.exact_resume_hook import skip_done_batches
from gmpq_mm.registry import DATASETS, LOOPS
from gmpq_mm.utils.model import unwrap_model

SEARCH_MODES = ('bilevel', 'single')


def split_dataset(dataset, arch_fraction: float, seed: int):
    """Cut a dataset into disjoint ``(weights part, arch part)``.

    The cut is a seeded permutation, identical on every rank and on resume.
    """
    n = len(dataset)
    n_arch = int(round(n * arch_fraction))
    if not 0 < n_arch < n:
        raise ValueError(f'arch_fraction={arch_fraction} of {n} samples '
                         'leaves one part empty')
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    arch_idx = sorted(perm[:n_arch].tolist())
    weight_idx = sorted(perm[n_arch:].tolist())
    if isinstance(dataset, BaseDataset):
        return dataset.get_subset(weight_idx), dataset.get_subset(arch_idx)
    return Subset(dataset, weight_idx), Subset(dataset, arch_idx)


def _forward_loss(model, optim_wrapper, data_batch):
    """Preprocess, forward in ``mode='loss'`` and parse the losses."""
    module = unwrap_model(model)
    with optim_wrapper.optim_context(model):
        data = module.data_preprocessor(data_batch, True)
        losses = model(**data, mode='loss')
    return module.parse_losses(losses)


def arch_step(model, optim_dict, data_batch):
    """One step of the alphas.

    Only the alphas need gradients here, so the weights are frozen for this
    backward (no weight-gradient convolutions) and, under DDP, the
    backward runs without DDP's bucketed sync -- whose buckets expect every
    weight -- and the alphas' gradients are averaged across ranks by hand.
    """
    module = unwrap_model(model)
    arch = optim_dict['arch']
    optim_dict.zero_grad()
    frozen = [p for p in module.weight_parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        sync_off = model.no_sync() if hasattr(model, 'no_sync') else \
            contextlib.nullcontext()
        with sync_off:
            loss, log_vars = _forward_loss(model, arch, data_batch)
            arch.backward(loss)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    if torch_dist.is_available() and torch_dist.is_initialized():
        world = torch_dist.get_world_size()
        for p in module.arch_parameters():
            if p.grad is not None:
                torch_dist.all_reduce(p.grad)
                p.grad.div_(world)
    arch.step()
    optim_dict.zero_grad()
    return log_vars


def weights_step(model, optim_dict, data_batch):
    """One step of the network weights (and quantizer ranges)."""
    optim_dict.zero_grad()
    return model.train_step(data_batch, optim_wrapper=optim_dict['weights'])


def bilevel_step(model, optim_dict, weights_batch, arch_batch):
    """First-order DARTS: an alpha step on an arch batch, then a weight
    step on a weights batch. Returns the weight step's log variables plus
    the arch step's losses prefixed ``arch_``."""
    arch_logs = arch_step(model, optim_dict, arch_batch)
    outputs = weights_step(model, optim_dict, weights_batch)
    outputs.update({
        f'arch_{k}': v
        for k, v in arch_logs.items() if k.startswith('loss')
    })
    return outputs


def single_level_step(model, optim_dict, data_batch):
    """The released code's step: one forward and backward, then both
    optimizers step."""
    weights, arch = optim_dict['weights'], optim_dict['arch']
    optim_dict.zero_grad()
    loss, log_vars = _forward_loss(model, weights, data_batch)
    weights.backward(loss)
    if isinstance(weights, AmpOptimWrapper):
        # One scaled backward: the weights' scaler unscales and checks the
        # arch step too, before it updates its scale.
        weights.loss_scaler.step(arch.optimizer)
    else:
        arch.step()
    weights.step()
    optim_dict.zero_grad()
    return log_vars


def check_temperature(temperature: Optional[Dict]) -> Optional[Dict]:
    """``dict(start=T0, end=T1)`` with positive floats, or None."""
    if temperature is None:
        return None
    if not isinstance(temperature, dict) or \
            set(temperature) != {'start', 'end'}:
        raise ValueError(
            'SearchLoop: temperature must be '
            "dict(start=T0, end=T1), got {!r}".format(temperature))
    out = {}
    for key in ('start', 'end'):
        value = temperature[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not value > 0:
            raise ValueError(f'SearchLoop: temperature[{key!r}] must be a '
                             f'number > 0, got {value!r}')
        out[key] = float(value)
    return out


def annealed_temperature(start: float, end: float, done: int,
                         total: int) -> float:
    """Geometric schedule: ``start`` at ``done = 0``, ``end`` at ``done =
    total`` (``total <= 0``: ``end``)."""
    if total <= 0:
        return end
    frac = min(max(done / total, 0.0), 1.0)
    return start * (end / start)**frac


@LOOPS.register_module()
class SearchLoop(EpochBasedTrainLoop):
    """Epoch loop of the GMPQ search with two optimizers.

    Modes:

    - ``'bilevel'`` (first-order DARTS): the train set is cut into a
      *weights* part and an *arch* part (``arch_fraction`` of it, or a
      separate ``arch_dataloader``). Every iteration takes one step of the
      ``arch`` optimizer (alphas) on an arch batch, then one step of the
      ``weights`` optimizer on a weights batch.
    - ``'single'`` (the released code): one batch, one backward, then both
      optimizers step.

    Gradients of the other group are cleared before each step so nothing
    leaks between them. Under DDP the alphas' gradients are all-reduced with
    the rest, so the alphas stay identical on every rank. Both samplers get
    ``set_epoch`` every epoch; ``--resume`` restores the alphas (model),
    both optimizers and schedulers (runner) and the epoch (this loop).

    Args:
        runner: The runner.
        dataloader (dict | DataLoader): The train dataloader config.
        max_epochs (int): Search epochs.
        mode (str): ``'bilevel'`` or ``'single'``.
        arch_fraction (float): Share of the train set used for the alphas in
            bilevel mode (ignored when ``arch_dataloader`` is given).
        arch_dataloader (dict, optional): A dataloader for the alpha steps.
        split_seed (int): Seed of the weights/arch split.
        arch_warmup_epochs (int): Epochs at the start in which only the
            weights step (no alpha step, so the probabilities stay where
            they are while the supernet's weights adapt to quantization).
            In bilevel mode the warm-up takes no arch batches either.
            Defaults to 0 (the released code: alphas move from the first
            iteration).
        temperature (dict, optional): Anneal the softmax temperature of
            every mixed layer, ``dict(start=T0, end=T1)``: ``T0`` during the
            warm-up, then geometrically from ``T0`` to ``T1`` over the
            iterations with alpha steps (``T1`` at the last one). Set before
            every iteration from the iteration count, so a resumed search
            continues the schedule. A lower ``T`` sharpens the candidate
            probabilities and multiplies the effect of an alpha step by
            ``1 / T``. Defaults to None (``T = 1`` throughout: the released
            code's softmax).
        **kwargs: ``val_begin``, ``val_interval``, ``dynamic_intervals``.
    """

    def __init__(self,
                 runner,
                 dataloader: Union[Dict, DataLoader],
                 max_epochs: int,
                 mode: str = 'bilevel',
                 arch_fraction: float = 0.5,
                 arch_dataloader: Optional[Dict] = None,
                 split_seed: int = 0,
                 arch_warmup_epochs: int = 0,
                 temperature: Optional[Dict] = None,
                 **kwargs):
        if mode not in SEARCH_MODES:
            raise ValueError(f"SearchLoop: mode must be one of "
                             f"{SEARCH_MODES}, got {mode!r}")
        if int(arch_warmup_epochs) != arch_warmup_epochs or \
                not 0 <= arch_warmup_epochs < max_epochs:
            raise ValueError(
                'SearchLoop: arch_warmup_epochs must be an integer in '
                f'[0, max_epochs={max_epochs}), got {arch_warmup_epochs!r}')
        self.mode = mode
        self.arch_warmup_epochs = int(arch_warmup_epochs)
        self.temperature = check_temperature(temperature)
        arch_loader_cfg = None
        if mode == 'bilevel':
            if not isinstance(dataloader, dict):
                raise TypeError('SearchLoop(bilevel) needs the train '
                                'dataloader as a config dict to split it')
            dataloader = copy.deepcopy(dataloader)
            if arch_dataloader is not None:
                arch_loader_cfg = copy.deepcopy(arch_dataloader)
            else:
                dataset = unwrap_seeded(dataloader['dataset'])
                if isinstance(dataset, dict):
                    dataset = DATASETS.build(dataset)
                weights_part, arch_part = split_dataset(
                    dataset, arch_fraction, split_seed)
                arch_loader_cfg = copy.deepcopy({
                    k: v
                    for k, v in dataloader.items() if k != 'dataset'
                })
                arch_loader_cfg['dataset'] = arch_part
                dataloader['dataset'] = weights_part
            # Every sample under a random state of its own: a resumed
            # search draws the augmentation the uninterrupted one drew.
            dataloader = seed_every_sample(dataloader)
            arch_loader_cfg = seed_every_sample(arch_loader_cfg)
        super().__init__(runner, dataloader, max_epochs, **kwargs)
        self.arch_dataloader = None
        if arch_loader_cfg is not None:
            self.arch_dataloader = runner.build_dataloader(
                arch_loader_cfg,
                seed=runner.seed,
                diff_rank_seed=runner._randomness_cfg.get(
                    'diff_rank_seed', False))
        self._arch_iter = None

    # ------------------------------------------------------------------
    def _optim_wrappers(self):
        optim = self.runner.optim_wrapper
        if not isinstance(optim, OptimWrapperDict) or \
                set(optim.keys()) != {'weights', 'arch'}:
            raise TypeError('SearchLoop needs optim_wrapper with '
                            "constructor='SearchOptimWrapperConstructor' (an "
                            "OptimWrapperDict with 'weights' and 'arch'), got "
                            f'{type(optim).__name__}')
        return optim

    def _next_arch_batch(self):
        try:
            return next(self._arch_iter)
        except StopIteration:
            # Shorter arch part: start it again within the epoch.
            self._arch_iter = iter(self.arch_dataloader)
            return next(self._arch_iter)

    def run_epoch(self) -> None:
        self._optim_wrappers()
        if self.arch_dataloader is not None:
            sampler = getattr(self.arch_dataloader, 'sampler', None)
            if hasattr(sampler, 'set_epoch'):
                sampler.set_epoch(self._epoch)
            # Resumed mid-epoch: the arch batches already taken this epoch
            # (one per iteration past the warm-up) are not taken again.
            done = self._iter - self._epoch * len(self.dataloader)
            if self._epoch >= self.arch_warmup_epochs:
                skip_done_batches(self.arch_dataloader, done)
            self._arch_iter = iter(self.arch_dataloader)
        super().run_epoch()

    def current_temperature(self) -> float:
        """The softmax temperature of the iteration about to run."""
        t = self.temperature
        if t is None:
            return 1.0
        warmup = self.arch_warmup_epochs * len(self.dataloader)
        arch_iters = self.max_iters - warmup
        # the iteration about to run counts as done: T1 at the last one
        return annealed_temperature(t['start'], t['end'],
                                    self._iter + 1 - warmup, arch_iters) \
            if self._iter >= warmup else t['start']

    def _set_temperature(self, value: float) -> None:
        for module in unwrap_model(self.runner.model).modules():
            if hasattr(module, 'temperature') and \
                    hasattr(module, 'arch_parameters'):
                module.temperature = value

    def run_iter(self, idx, data_batch) -> None:
        self.runner.call_hook(
            'before_train_iter', batch_idx=idx, data_batch=data_batch)
        optim = self._optim_wrappers()
        model = self.runner.model
        if self.temperature is not None:
            self._set_temperature(self.current_temperature())
        if self._epoch < self.arch_warmup_epochs:
            outputs = weights_step(model, optim, data_batch)
        elif self.mode == 'bilevel':
            outputs = bilevel_step(model, optim, data_batch,
                                   self._next_arch_batch())
        else:
            outputs = single_level_step(model, optim, data_batch)
        self.runner.call_hook(
            'after_train_iter',
            batch_idx=idx,
            data_batch=data_batch,
            outputs=outputs)
        self._iter += 1
