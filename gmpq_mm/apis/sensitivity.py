"""A bit policy at a budget from per-layer sensitivity, without a search.

Floor 2 glue for ``tools/analysis/sensitivity.py`` (and the policy study):
the network, the searchable layers, their candidates and MACs come from a
search config (its ``MixedPrecisionBackbone``), the weights from the FP
checkpoint of that network (the search's teacher), the calibration batches
from the config's training dataloader. The numerics are floor 1's
(:mod:`gmpq_mm.quantization.sensitivity`), the allocation the exact solver
of :mod:`gmpq_mm.quantization.solver` with ``score = -sensitivity``::

    from gmpq_mm.apis.sensitivity import sensitivity_policy
    out = sensitivity_policy(
        'configs/gmpq/demo/search_r18_fashion_mnist.py',
        'work_dirs/demo/pretrain/epoch_3.pth', target_bitops=30e6,
        work_dir='work_dirs/demo/sensitivity')
    out['policy']['layers'], out['seconds']

Every check on the inputs (method, budget, files, the checkpoint against
the network, the calibration data) runs before anything is measured.
"""
import copy
import json
import os
import os.path as osp
import time
from collections import OrderedDict
from typing import Optional

import torch
from mmengine.registry import init_default_scope

from gmpq_mm.engine.checkpoint_load import load_checkpoint_file
from gmpq_mm.quantization.budget import (bitops_constraint, check_budget,
                                         policy_cost, policy_size_mb,
                                         size_constraint)
from gmpq_mm.quantization.complexity import count_macs, size_terms
from gmpq_mm.quantization.layers import is_mixed_layer
from gmpq_mm.quantization.policy import make_policy, save_policy
from gmpq_mm.quantization.sensitivity import (METHODS, allocate_bits,
                                              layer_sensitivity)
from gmpq_mm.quantization.targets import (TARGETS, get_target,
                                          with_target_candidates)
from gmpq_mm.registry import MODELS
from gmpq_mm.utils import register_all_modules
from gmpq_mm.utils.config_checks import find_missing_paths
from gmpq_mm.utils.model import state_dict_mismatch
from gmpq_mm.utils.quantization_summary import config_type, inner_backbone
from .deploy import as_config, model_config

__all__ = ['sensitivity_policy', 'pair_key']

DEFAULT_TOLERANCE = 0.02
OUTPUT_FILES = ('policy.json', 'sensitivity.json', 'sensitivity.md',
                'sensitivity.png')


def pair_key(w_bits: int, a_bits: int) -> str:
    """``(4, 3) -> 'w4a3'``: how a pair is named in the table."""
    return f'w{int(w_bits)}a{int(a_bits)}'


def _missing_data_roots(dataset, where):
    """``[(key, path)]`` of local ``data_root`` s that do not exist, in
    ``dataset`` and the datasets it wraps."""
    if not isinstance(dataset, dict):
        return []
    out = []
    root = dataset.get('data_root')
    if isinstance(root, str) and root and '://' not in root and \
            not osp.exists(root):
        out.append((f'{where}.data_root', root))
    if isinstance(dataset.get('dataset'), dict):
        out += _missing_data_roots(dataset['dataset'], f'{where}.dataset')
    for i, sub in enumerate(dataset.get('datasets') or []):
        out += _missing_data_roots(sub, f'{where}.datasets[{i}]')
    return out


def _search_backbone(cfg, where):
    backbone = cfg.model.get('backbone')
    if config_type(backbone) != 'MixedPrecisionBackbone':
        raise ValueError(f'{where}: model.backbone must be a '
                         f'MixedPrecisionBackbone (a search config), got '
                         f'{config_type(backbone) or backbone!r}')
    return backbone


def _fp_classifier_cfg(cfg, backbone):
    """The FP network: the wrapped backbone with the config's neck and head,
    as a plain ImageClassifier (the search's teacher is not built)."""
    full = model_config(cfg)
    out = dict(
        type='ImageClassifier',
        backbone=copy.deepcopy(inner_backbone(dict(backbone))))
    for key in ('neck', 'head', 'data_preprocessor'):
        if full.get(key) is not None:
            out[key] = full[key]
    return out


def _load_checkpoint(model, checkpoint, where):
    state = load_checkpoint_file(checkpoint, map_location='cpu')
    state = state.get('state_dict', state)
    state = {
        k[7:] if k.startswith('module.') else k: v
        for k, v in state.items()
    }
    problems = state_dict_mismatch(state, model.state_dict())
    if problems:
        raise ValueError(f'checkpoint {checkpoint} does not fit the network '
                         f'of {where}: ' + '; '.join(problems))
    model.load_state_dict(state)


def _calibration_batches(cfg, model, count, seed, where):
    from mmengine.runner import Runner
    loader_cfg = copy.deepcopy(cfg.get('train_dataloader'))
    if not loader_cfg:
        raise ValueError(f'{where}: no train_dataloader to read calibration '
                         'batches from')
    loader = Runner.build_dataloader(loader_cfg, seed=seed)
    batches = []
    for data in loader:
        if len(batches) == count:
            break
        with torch.no_grad():
            batches.append(model.data_preprocessor(data, False))
    if len(batches) < count:
        raise ValueError(f'{where}: train_dataloader gives {len(batches)} '
                         f'batch(es), calib_batches asks for {count}')
    return batches, len(loader.dataset)


def _loss(model, batch):
    return model.loss(batch['inputs'], batch['data_samples'])['loss']


def _target_meta(target):
    """A target as a policy records it: a preset's name, or the dict."""
    if target is None:
        return None
    if TARGETS.get(target.name) == target:
        return target.name
    return {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in target._asdict().items()
    }


def _finite(value):
    """``value`` as a float, or None when it is NaN (valid JSON)."""
    value = float(value)
    return value if value == value else None


def _traces(row):
    """The Hessian traces of a row (``'hessian'`` only), whole and per
    element."""
    if 'weight_trace' not in row:
        return {}
    return dict(
        weight_trace=float(row['weight_trace']),
        input_trace=float(row['input_trace']),
        weight_trace_se=_finite(row['weight_trace_se']),
        input_trace_se=_finite(row['input_trace_se']),
        weight_trace_per_element=row['weight_trace'] / row['weight_numel'],
        input_trace_per_element=row['input_trace'] / row['input_numel'])


def _table(result, names, macs, params, policy, pairs):
    rows = []
    for name in names:
        row = result['layers'][name]
        rows.append(
            OrderedDict(
                name=name,
                macs=int(macs[name]),
                params=int(params[name]),
                signed=bool(row['signed']),
                chosen=list(policy[name]),
                sensitivity={
                    pair_key(*p): float(row['sensitivity'][p])
                    for p in pairs
                },
                **_traces(row),
                w_error={
                    str(b): v
                    for b, v in row['w_error'].items()
                },
                a_error={
                    str(b): v
                    for b, v in row['a_error'].items()
                },
                a_range={
                    str(b): v
                    for b, v in row['a_range'].items()
                }))
    return rows


def _check_arguments(config, checkpoint, target_bitops, target_size_mb,
                     tolerance, method, calib_batches, num_samples):
    """Every check that needs no file read beyond existence."""
    if isinstance(config, str) and not osp.isfile(config):
        raise FileNotFoundError(f'config file not found: {config}')
    if method not in METHODS:
        raise ValueError(f'method must be one of {METHODS}, got {method!r}')
    check_budget(target_bitops, 'target_bitops', '300e6')
    check_budget(target_size_mb, 'target_size_mb', '0.5')
    if target_bitops is None and target_size_mb is None:
        raise ValueError('give a budget: target_bitops and / or '
                         'target_size_mb')
    if tolerance is not None and (isinstance(tolerance, bool)
                                  or not 0 <= tolerance < 1):
        raise ValueError(f'tolerance must be None or in [0, 1), got '
                         f'{tolerance!r}')
    for value, name in ((calib_batches, 'calib_batches'), (num_samples,
                                                           'num_samples')):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive int, got {value!r}')
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {checkpoint}')


def _check_data(cfg, where):
    loader_cfg = cfg.get('train_dataloader')
    # A missing data_root is refused even where the dataset class could
    # download it: calibration reads the data that is there.
    missing = _missing_data_roots(
        loader_cfg and loader_cfg.get('dataset'),
        'train_dataloader.dataset') + find_missing_paths(
            dict(train_dataloader=loader_cfg), ('train', ))
    if missing:
        key, path = missing[0]
        raise FileNotFoundError(f'calibration data not found: {key}: {path} '
                                f'(in {where})')


def _network(cfg, backbone_cfg, checkpoint, where):
    """The FP network with the checkpoint loaded, and what the search would
    see: its searchable layers (found by building the search's own
    ``MixedPrecisionBackbone``: same names, candidates and signed inputs),
    their MACs and the model-size terms."""
    net = MODELS.build(_fp_classifier_cfg(cfg, backbone_cfg))
    _load_checkpoint(net, checkpoint, where)
    net.eval()
    supernet = MODELS.build(copy.deepcopy(dict(backbone_cfg)))
    mixed = OrderedDict(
        (n, m) for n, m in supernet.named_modules() if is_mixed_layer(m))
    names = list(mixed)
    first = next(iter(mixed.values()))
    input_shape = tuple(cfg.model.get('input_shape', (3, 32, 32)))
    all_macs = count_macs(net.backbone, input_shape)
    # Size as the search counts it: the supernet's fixed part (stem,
    # BatchNorm, ranges...) plus the FP neck and head, at 32 bits.
    fixed, numels = size_terms(supernet, names)
    for part in (net.neck, net.head):
        if part is not None:
            fixed += size_terms(part, [])[0]
    return dict(
        net=net,
        names=names,
        w_cands=tuple(first.w_candidates),
        a_cands=tuple(first.a_candidates),
        signed={
            n: bool(m.signed)
            for n, m in mixed.items()
        },
        per_channel=bool(first.per_channel),
        input_shape=input_shape,
        macs=OrderedDict((n, int(all_macs[n].macs)) for n in names),
        numels=numels,
        size_fixed_bits=fixed)


def _constraints(info, target_bitops, target_size_mb, tolerance):
    """The budgets as solver constraints; an unreachable one fails here,
    before anything is measured."""
    constraints, fields = [], []
    if target_bitops is not None:
        constraints.append(
            bitops_constraint(info['macs'], info['names'], target_bitops,
                              tolerance))
        fields.append(f'target_bitops={target_bitops:g}')
    if target_size_mb is not None:
        constraints.append(
            size_constraint(info['size_fixed_bits'], info['numels'],
                            target_size_mb, tolerance))
        fields.append(f'target_size_mb={target_size_mb:g}')
    pairs = [(w, a) for w in info['w_cands'] for a in info['a_cands']]
    try:
        allocate_bits({n: dict.fromkeys(pairs, 0.0)
                       for n in info['names']}, constraints)
    except ValueError as err:
        raise ValueError(f'{", ".join(fields)} (tolerance {tolerance}): '
                         f'{err}') from None
    return constraints


def sensitivity_policy(config,
                       checkpoint: str,
                       *,
                       target_bitops: Optional[float] = None,
                       target_size_mb: Optional[float] = None,
                       tolerance: Optional[float] = DEFAULT_TOLERANCE,
                       method: str = 'hessian',
                       calib_batches: int = 4,
                       num_samples: int = 8,
                       calib_method: str = 'release',
                       work_dir: Optional[str] = None,
                       seed: int = 0,
                       cfg_options: Optional[dict] = None) -> dict:
    """Measure each searchable layer's sensitivity and allocate bits.

    Args:
        config: A search config (path, Config or dict) whose
            ``model.backbone`` is a ``MixedPrecisionBackbone``: it names
            the searchable layers and the (w, a) candidates;
            ``model.input_shape`` gives the shape the MACs are counted at.
        checkpoint: The full-precision checkpoint of that network (the
            search's teacher: keys ``backbone.*``, ``head.*``).
        target_bitops: BitOPs budget of the searchable layers.
        target_size_mb: Model-size budget in MB (1e6 bytes), counted as
            the search counts it. Give one budget or both.
        tolerance: Each budget ``B`` is met in ``[(1 - tolerance) * B,
            B]`` (0.02, as the policy study); None: only ``<= B``.
        method: ``'hessian'`` (default) or ``'perturbation'``.
        calib_batches: Batches of the training dataloader to measure on.
        num_samples: Hutchinson vectors per batch (``'hessian'``).
        calib_method: Quantizer thresholds and ranges, as the finetune's
            ``CalibrationHook`` (``'release'`` by default).
        work_dir: If given, ``policy.json``, ``sensitivity.json``,
            ``sensitivity.md`` and ``sensitivity.png`` are written there.
        seed: Seed of the dataloader's shuffle / augmentation and of the
            Hutchinson vectors.
        cfg_options: Overrides merged into the config.

    Returns:
        dict: ``policy`` (a policy dict, as ``policy.json``), ``table``
        (as ``sensitivity.json``), ``seconds`` (building, measuring and
        allocating, wall clock) and ``files`` (paths written, if any).
    """
    start = time.perf_counter()
    where = config if isinstance(config, str) else '<config>'
    _check_arguments(config, checkpoint, target_bitops, target_size_mb,
                     tolerance, method, calib_batches, num_samples)
    cfg = as_config(config, cfg_options)
    _check_data(cfg, where)
    backbone_cfg = _search_backbone(cfg, where)
    target = cfg.model.get('target')
    if target is not None:
        # A deployment target's native widths are the candidates, as in
        # the search (GMPQSearchClassifier).
        target = get_target(target, where='model.target')
        backbone_cfg, _ = with_target_candidates(backbone_cfg, target)

    register_all_modules()
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    torch.manual_seed(seed)
    info = _network(cfg, backbone_cfg, checkpoint, where)
    constraints = _constraints(info, target_bitops, target_size_mb, tolerance)
    net, names = info['net'], info['names']
    batches, dataset_len = _calibration_batches(cfg, net, calib_batches, seed,
                                                where)
    prep = time.perf_counter()

    prefixed = OrderedDict((f'backbone.{n}', n) for n in names)
    result = layer_sensitivity(
        net,
        list(prefixed),
        _loss,
        batches,
        info['w_cands'],
        info['a_cands'],
        method=method,
        signed={
            p: info['signed'][n]
            for p, n in prefixed.items()
        },
        calib_method=calib_method,
        per_channel=info['per_channel'],
        num_samples=num_samples,
        seed=seed)
    result['layers'] = OrderedDict(
        (n, result['layers'][p]) for p, n in prefixed.items())
    measured = time.perf_counter()
    policy_layers = allocate_bits(
        {n: result['layers'][n]['sensitivity']
         for n in names}, constraints)
    done = time.perf_counter()

    seconds = OrderedDict(
        build=prep - start,
        measure=measured - prep,
        allocate=done - measured,
        total=done - start)
    settings = OrderedDict(
        config=where,
        checkpoint=checkpoint,
        method=method,
        calib_method=calib_method,
        calib_batches=calib_batches,
        batch_size=int(batches[0]['inputs'].shape[0]),
        dataset_size=dataset_len,
        num_samples=num_samples if method == 'hessian' else None,
        seed=seed,
        target_bitops=target_bitops,
        target_size_mb=target_size_mb,
        tolerance=tolerance,
        target=_target_meta(target))
    policy, table = _outputs(info, result, policy_layers, settings, seconds)
    files = _write(work_dir, policy, table) if work_dir else []
    return dict(policy=policy, table=table, seconds=done - start, files=files)


def _outputs(info, result, policy_layers, settings, seconds):
    """The policy dict and the table, from the measurements."""
    names = info['names']
    bitops = policy_cost(info['macs'], policy_layers)
    size_mb = policy_size_mb(info['size_fixed_bits'], info['numels'],
                             policy_layers)
    total = sum(result['layers'][n]['sensitivity'][tuple(b)]
                for n, b in policy_layers.items())
    pairs = [(w, a) for w in info['w_cands'] for a in info['a_cands']]
    budget = settings['target_bitops']
    policy = make_policy(
        policy_layers,
        w_candidates=list(info['w_cands']),
        a_candidates=list(info['a_cands']),
        input_shape=list(info['input_shape']),
        bitops=int(bitops),
        budget=budget,
        source=(f"sensitivity ({settings['method']}) of "
                f"{settings['checkpoint']} on {settings['calib_batches']} x "
                f"{settings['batch_size']} training images of "
                f"{settings['config']}"),
        layer_macs=dict(info['macs']),
        layer_params=dict(info['numels']),
        size_mb=size_mb,
        size_budget_mb=settings['target_size_mb'],
        sensitivity_method=settings['method'],
        predicted_loss_increase=float(total),
        **({} if settings['target'] is None else dict(
            target=settings['target'])))
    table = OrderedDict(
        settings,
        input_shape=list(info['input_shape']),
        base_loss=float(result['base_loss']),
        pairs=[pair_key(*p) for p in pairs],
        bitops=int(bitops),
        size_mb=size_mb,
        predicted_loss_increase=float(total),
        seconds=seconds,
        layers=_table(result, names, info['macs'], info['numels'],
                      policy_layers, pairs))
    return policy, table


def _write(work_dir, policy, table):
    from gmpq_mm.utils.sensitivity_report import sensitivity_markdown
    from gmpq_mm.visualization.sensitivity_plot import plot_sensitivity
    os.makedirs(work_dir, exist_ok=True)
    paths = [osp.join(work_dir, f) for f in OUTPUT_FILES]
    save_policy(policy, paths[0])
    with open(paths[1], 'w', encoding='utf-8') as f:
        json.dump(table, f, indent=2)
        f.write('\n')
    with open(paths[2], 'w', encoding='utf-8') as f:
        f.write(sensitivity_markdown(table))
    plot_sensitivity(table, paths[3])
    return paths
