"""Calibrate the quantizer ranges of a fixed-bit network before finetuning.

The released GMPQ finetune sets every activation range and weight threshold
from the FP network on one batch before the first step (docs/method.md);
:class:`CalibrationHook` does that in ``before_train`` -- after the FP
weights are loaded (``init_cfg`` / ``load_from``) and before the first
iteration -- with the numerics of :mod:`gmpq_mm.quantization.calibration`.

* Under DDP every rank runs its own batches; maxima and histograms are
  all-reduced, so every rank computes the same ranges, and rank 0's values
  are broadcast on top as a guarantee. Per-rank digests of the result are
  gathered and compared (a mismatch raises) and logged.
* Skipped when resuming, and when the loaded checkpoint is already
  calibrated: checkpoints written after calibration carry
  ``meta['gmpq_calibration']``.
* Before calibrating, the FP checkpoint of every ``init_cfg=dict(type=
  'Pretrained', ...)`` is checked against the module it initialised:
  mmengine loads it with ``strict=False`` and only warns, so a checkpoint of
  the wrong architecture would otherwise be calibrated and trained from a
  half-random network. A mismatch raises a ``ValueError`` naming the file.
"""
import hashlib
import json
import os.path as osp
from typing import Optional

import torch
from mmengine.dist import (all_gather_object, all_reduce, broadcast,
                           get_dist_info, is_main_process)
from mmengine.hooks import Hook

from gmpq_mm.engine.checkpoint_load import ReadOnce
from gmpq_mm.quantization.calibration import (DEFAULT_ACT_CAP, DEFAULT_BINS,
                                              DEFAULT_LOW_BITS, DEFAULT_METHOD,
                                              METHODS, calibrate_model,
                                              quantized_layers)
from gmpq_mm.quantization.requant_point import POINT_STATE
from gmpq_mm.registry import HOOKS
from gmpq_mm.utils.model import state_dict_mismatch, unwrap_model
from .expected_missing_keys import ExpectedMissingKeys

META_KEY = 'gmpq_calibration'
# State entries a quantized layer adds to its FP conv / linear: an FP
# checkpoint does not have them.
QUANT_STATE = ('act_range', 'w_threshold', POINT_STATE)


def _pretrained_inits(model):
    """``(module_name, module, checkpoint, prefix)`` of every Pretrained
    ``init_cfg`` in ``model``."""
    found = []
    for name, module in model.named_modules():
        cfgs = getattr(module, 'init_cfg', None)
        if cfgs is None:
            continue
        for cfg in cfgs if isinstance(cfgs, (list, tuple)) else [cfgs]:
            if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained' \
                    and cfg.get('checkpoint'):
                found.append(
                    (name, module, cfg['checkpoint'], cfg.get('prefix')))
    return found


def check_pretrained_init(model, map_location='cpu'):
    """Check that every Pretrained ``init_cfg`` checkpoint fits its module.

    The checkpoint's entries (under ``prefix``) must be exactly the
    module's ``state_dict`` entries with the same shapes, except the
    quantizer state (``act_range``, ``w_threshold``) and
    ``num_batches_tracked``, which an FP checkpoint may lack.

    Raises:
        ValueError: Naming the checkpoint file and the mismatching keys.
    """
    from mmengine.runner.checkpoint import (_load_checkpoint,
                                            _load_checkpoint_with_prefix)
    for name, module, checkpoint, prefix in _pretrained_inits(model):
        if prefix:
            state = _load_checkpoint_with_prefix(
                prefix, checkpoint, map_location=map_location)
        else:
            state = _load_checkpoint(checkpoint, map_location=map_location)
            state = state.get('state_dict', state)
        problems = state_dict_mismatch(
            state,
            module.state_dict(),
            optional=QUANT_STATE + ('num_batches_tracked', ))
        if problems:
            where = f'{name or type(module).__name__}'
            raise ValueError(
                f'{checkpoint}: FP checkpoint does not fit '
                f'{where} ({type(module).__name__}, init_cfg prefix '
                f'{prefix!r}): ' + '; '.join(problems) +
                '. Is it a checkpoint of another architecture?')


@HOOKS.register_module()
class CalibrationHook(Hook):
    """Set activation ranges and weight thresholds before the first step.

    Args:
        num_batches (int): Training batches per rank (statistics of all
            ranks are combined). The release used one batch of 192 images.
        method (str): The threshold for widths below ``low_bits``:
            ``'release'`` (the released code's rule, with its "KL
            threshold" computed as that code does; default), ``'kl'`` (TensorRT entropy
            calibration), ``'mse'`` (least quantization error) or
            ``'max'``. See :mod:`gmpq_mm.quantization.calibration`.
        weight_method (str | None): Another method for the weights.
        act_cap (float | None): Upper bound of activation ranges (6.0).
        low_bits (int): Widths below it use ``method``, the others the max.
        bins (int): Histogram bins.
        weights / activations (bool): What to calibrate.
        check_init (bool): Check Pretrained ``init_cfg`` checkpoints first
            (see :func:`check_pretrained_init`).
        save_file (str | None): JSON file in the work_dir (rank 0) with the
            calibrated values and the per-rank digests; None: none.
    """

    priority = 'VERY_HIGH'

    def __init__(self,
                 num_batches: int = 1,
                 method: str = DEFAULT_METHOD,
                 weight_method: Optional[str] = None,
                 act_cap: Optional[float] = DEFAULT_ACT_CAP,
                 low_bits: int = DEFAULT_LOW_BITS,
                 bins: int = DEFAULT_BINS,
                 weights: bool = True,
                 activations: bool = True,
                 check_init: bool = True,
                 save_file: Optional[str] = 'calibration.json'):
        for value in (method, weight_method or method):
            if value not in METHODS:
                raise ValueError(f'CalibrationHook: method {value!r} is not '
                                 f'one of {METHODS}')
        if int(num_batches) < 1:
            raise ValueError(f'CalibrationHook: num_batches must be >= 1, '
                             f'got {num_batches}')
        self.num_batches = int(num_batches)
        self.method = method
        self.weight_method = weight_method or method
        self.act_cap = act_cap
        self.low_bits = int(low_bits)
        self.bins = int(bins)
        self.weights = bool(weights)
        self.activations = bool(activations)
        self.check_init = bool(check_init)
        self.save_file = save_file
        self._skip_reason = None
        self._record = None
        self._quiet = None
        self._read_once = None

    # -- checkpoints -----------------------------------------------------
    def before_run(self, runner) -> None:
        # The FP weights (init_cfg / load_from) load after this and lack
        # the quantizer state calibration sets: not worth a warning.
        self._quiet = ExpectedMissingKeys(QUANT_STATE).attach(
            unwrap_model(runner.model))
        # ... and check_pretrained_init reads them again: the same object,
        # not a second unpickling.
        self._read_once = ReadOnce().start()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        meta = checkpoint.get('meta') or {}
        if meta.get(META_KEY):
            self._skip_reason = ('the loaded checkpoint is already '
                                 'calibrated')
            self._record = meta[META_KEY]
        elif getattr(runner, '_resume', False):
            self._skip_reason = 'resuming: the checkpoint holds the ranges'

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self._record is not None:
            checkpoint.setdefault('meta', {})[META_KEY] = self._record

    # -- calibration -------------------------------------------------------
    def _batches(self, runner, model):
        batches = []
        for i, data in enumerate(runner.train_dataloader):
            if i >= self.num_batches:
                break
            with torch.no_grad():
                data = model.data_preprocessor(data, False)
            batches.append(data['inputs'])
        if not batches:
            raise RuntimeError('CalibrationHook: the train dataloader gave '
                               'no batch to calibrate on')
        return batches

    @staticmethod
    def _sync_from_rank0(layers):
        """Broadcast rank 0's ranges / thresholds (identical already when
        the statistics were reduced; this makes it a guarantee)."""
        values = []
        for module in layers.values():
            values.append(module.act_range.detach().reshape(1).double())
            values.append(module.w_threshold.detach().reshape(-1).double())
        sizes = [v.numel() for v in values]
        flat = torch.cat(values) if values else torch.zeros(0)
        broadcast(flat, src=0)
        chunks = iter(flat.split(sizes))
        for module in layers.values():
            r = next(chunks)
            t = next(chunks)
            with torch.no_grad():
                module.act_range.copy_(r.reshape(()).to(module.act_range))
            if t.numel():
                module.w_threshold = t.to(module.weight).clone()
        return flat

    def before_train(self, runner) -> None:
        try:
            self._calibrate(runner)
        finally:
            if self._read_once is not None:
                self._read_once.stop()
                self._read_once = None

    def _calibrate(self, runner) -> None:
        left_out = self._quiet.detach() if self._quiet is not None else []
        if left_out:
            runner.logger.info(
                f'CalibrationHook: {len(left_out)} quantizer entries '
                f'({", ".join(QUANT_STATE)}) were not in the loaded weights '
                '(expected for FP weights)' +
                ('' if self._skip_reason else '; calibrating them now (the '
                 'ranges of requantization points: on the first training '
                 'batches)'))
        if self._skip_reason is not None:
            runner.logger.info(
                f'CalibrationHook: skipped ({self._skip_reason})')
            return
        model = unwrap_model(runner.model)
        if self.check_init:
            check_pretrained_init(model)
        layers = quantized_layers(model)
        if not layers:
            runner.logger.info('CalibrationHook: no fixed-bit layer; '
                               'nothing to calibrate')
            return
        rank, world_size = get_dist_info()

        def reduce_max(t):
            all_reduce(t, op='max')

        def reduce_sum(t):
            all_reduce(t, op='sum')

        batches = self._batches(runner, model)
        rows = calibrate_model(
            model,
            batches,
            forward=lambda m, x: m(x, mode='tensor'),
            method=self.method,
            act_cap=self.act_cap,
            low_bits=self.low_bits,
            bins=self.bins,
            weights=self.weights,
            activations=self.activations,
            weight_method=self.weight_method,
            reduce_max=reduce_max,
            reduce_sum=reduce_sum)
        flat = self._sync_from_rank0(layers)
        digest = hashlib.sha256(flat.cpu().numpy().tobytes()).hexdigest()[:16]
        digests = all_gather_object(digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f'CalibrationHook: ranks disagree after '
                               f'calibration: {digests}')
        images = sum(int(b.shape[0]) for b in batches) * world_size
        self._record = dict(
            method=self.method,
            weight_method=self.weight_method,
            num_batches=self.num_batches,
            images=images,
            world_size=world_size,
            digest=digest,
            act_cap=self.act_cap,
            low_bits=self.low_bits)
        for name, module in layers.items():
            rows[name]['act_range'] = float(module.act_range.detach())
            if module.w_threshold.numel():
                rows[name]['w_threshold'] = [
                    float(v) for v in module.w_threshold.reshape(-1)
                ]
        runner.logger.info(
            f'CalibrationHook: {len(layers)} layers calibrated '
            f'(method {self.method}, {images} images on {world_size} '
            f'rank(s)); digest {digest} on every rank: {digests}\n' +
            self._table(rows))
        if self.save_file and is_main_process():
            path = osp.join(runner.work_dir, self.save_file)
            with open(path, 'w') as f:
                json.dump(
                    dict(self._record, rank_digests=digests, layers=rows),
                    f,
                    indent=2)

    @staticmethod
    def _table(rows) -> str:

        def fmt(v):
            if v is None:
                return '-'
            if isinstance(v, list):
                return f'{v[0]:.4g}' if len(v) == 1 else f'[{len(v)}]'
            return f'{v:.4g}'

        lines = [
            f'{"layer":<28} {"W":>2} {"A":>2} {"max|x|":>8} '
            f'{"r":>8} {"max|W|":>8} {"T":>8}'
        ]
        for name, row in rows.items():
            w_t = row['w_threshold']
            lines.append(
                f'{name:<28} {row["w_bits"]:>2} {row["a_bits"]:>2} '
                f'{fmt(row["act_max"]):>8} {fmt(row["act_range"]):>8} '
                f'{fmt(row["w_max"]):>8} '
                f'{fmt(w_t) if w_t is not None else "max|W|":>8}')
        return '\n'.join(lines)
