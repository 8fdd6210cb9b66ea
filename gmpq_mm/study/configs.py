"""The configs of a study's runs: the demo configs, cut to the study's data.

Every run starts from one of ``configs/gmpq/demo/*_r18_fashion_mnist.py``
and changes only what the preset says.
"""
import copy
import os.path as osp

from .presets import CLASSES, DEMO, SETTINGS, SPLITS
from .results import read_result

__all__ = ['base_config', 'with_data', 'teacher_model', 'search_config']

_BASE = {}


def base_config(name):
    """A fresh copy of the demo config ``<name>_r18_fashion_mnist.py``
    (``name``: pretrain, search or finetune), without yapf formatting."""
    from mmengine.config import Config
    if name not in _BASE:
        cfg = Config.fromfile(osp.join(DEMO, f'{name}_r18_fashion_mnist.py'))
        # No yapf formatting of the config text: mmengine formats it five
        # times per Runner (log, dump, visualizer, ...), which took 40 of
        # the 46 s of a tiny finetune; the dumped config stays valid Python.
        # (fromfile drops format_python_code for plain configs, so rebuild.)
        _BASE[name] = Config(
            cfg.to_dict(), filename=cfg.filename, format_python_code=False)
    return copy.deepcopy(_BASE[name])


def with_data(cfg, study, split):
    """``cfg`` trained and tested on the study's IDX files of ``split``
    (``WORK_DIR/data/<split>``), quiet, on one process, no validation."""
    root = osp.join(study['work_dir'], 'data', split)
    res, n = study['resolution'], len(SPLITS[split])
    meta = dict(classes=[CLASSES[c] for c in SPLITS[split]])
    train = cfg.train_dataloader
    train.batch_size = study['batch_size']
    train.dataset.data_root = root
    train.dataset.metainfo = meta
    train.dataset.pipeline = [
        dict(type='RandomCrop', crop_size=res, padding=2),
        dict(type='RandomFlip', prob=0.5, direction='horizontal'),
        dict(type='PackInputs')
    ]
    test = copy.deepcopy(cfg.test_dataloader)
    test.dataset.data_root = root
    test.dataset.metainfo = meta
    cfg.test_dataloader = test
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.data_preprocessor.num_classes = n
    cfg.model.head.num_classes = n
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1000)
    cfg.default_hooks.checkpoint = None
    cfg.custom_hooks = [
        h for h in cfg.get('custom_hooks', [])
        if h['type'] != 'PolicyExportHook'
    ]
    for hook in cfg.custom_hooks:
        if hook['type'] == 'CalibrationHook':
            # fewer histogram bins: the threshold search is the slowest part
            # of a short finetune on CPU
            hook['bins'] = study['calibration_bins']
            hook['num_batches'] = study['calibration_batches']
    cfg.log_level = 'WARNING'
    cfg.launcher = 'none'
    cfg.env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
    return cfg


def teacher_model(study, split, out_indices=(3, )):
    """The FP network's model dict for ``split`` (its class count)."""
    cfg = base_config('pretrain').model.to_dict()
    cfg['backbone']['out_indices'] = tuple(out_indices)
    cfg['head']['num_classes'] = len(SPLITS[split])
    return cfg


def search_config(study, setting, method, budget):
    """The search's config: the demo search on the setting's search split,
    against its teacher, with the study's search settings."""
    s = study['search']
    split = SETTINGS[setting][0]
    teacher = read_result(study, f'teacher_{split}')
    stages = s['attribution_stages']
    out_indices = tuple(sorted({3, *(st % 4 for st in stages)})) \
        if stages else (3, )
    cfg = with_data(base_config('search'), study, split)
    model = cfg.model
    model.backbone.backbone.out_indices = out_indices
    model.teacher = teacher_model(study, split, out_indices)
    model.teacher_checkpoint = teacher['checkpoint']
    model.input_shape = (1, study['resolution'], study['resolution'])
    model.target_bitops = budget
    # the searched policies spend the budget like the random ones do
    model.target_bitops_tolerance = 0.02
    model.attribution_stages = list(range(len(out_indices))) \
        if stages else None
    model.attribution_loss.loss_weight = s['aw'] if method == 'gmpq' else 0.
    model.complexity_loss.loss_weight = s['cd']
    model.complexity_loss.mode = s.get('cd_mode', 'reference')
    model.init_from_teacher = s.get('init_from_teacher', False)
    cfg.optim_wrapper.weights.optimizer.lr = s['weights_lr']
    cfg.optim_wrapper.arch.optimizer = dict(s['arch_optimizer'])
    cfg.param_scheduler = dict(
        weights=[
            dict(type='CosineAnnealingLR', T_max=s['epochs'], by_epoch=True)
        ],
        arch=[dict(type='ConstantLR', factor=1.0, by_epoch=True)])
    cfg.train_cfg = dict(
        type='SearchLoop',
        mode=s['mode'],
        max_epochs=s['epochs'],
        arch_warmup_epochs=s['arch_warmup_epochs'],
        temperature=s.get('temperature'))
    return cfg
