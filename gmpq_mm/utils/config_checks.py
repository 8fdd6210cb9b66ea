"""Fail fast on paths a config names but that are not there.

Runs before the Runner is built, so a typo in ``data_root`` or a checkpoint
path costs seconds, not the time to build a model and start an epoch.
"""
import os.path as osp

REMOTE_PREFIXES = ('http://', 'https://', 'torchvision://', 'modelzoo://',
                   'open-mmlab://', 's3://', 'mmcls://', 'mmpretrain://')
# Model-config keys whose string values name files to read.
CHECKPOINT_KEYS = ('checkpoint', 'teacher_checkpoint', 'policy')
# Dataset types that fetch their files when ``download=True``.
DOWNLOADABLE = ('CIFAR10', 'CIFAR100', 'CIFAR10Format', 'CIFAR100Format',
                'MNIST', 'FashionMNIST')


def _is_local(path):
    return isinstance(path, str) and path and not path.startswith(
        REMOTE_PREFIXES)


def _dataset_problems(dataset, where):
    """Yield ``(where, path)`` for missing dataset paths (wrappers too)."""
    if not isinstance(dataset, dict):
        return
    for key in ('dataset', ):
        if key in dataset:
            yield from _dataset_problems(dataset[key], f'{where}.{key}')
    for i, sub in enumerate(dataset.get('datasets', []) or []):
        yield from _dataset_problems(sub, f'{where}.datasets[{i}]')
    data_root = dataset.get('data_root', '') or ''
    may_download = (dataset.get('type') in DOWNLOADABLE
                    and dataset.get('download', True))
    if _is_local(data_root) and not osp.exists(data_root):
        if not may_download:
            yield f'{where}.data_root', data_root
        return
    ann_file = dataset.get('ann_file', '') or ''
    if _is_local(ann_file):
        path = ann_file if osp.isabs(ann_file) else osp.join(
            data_root, ann_file)
        # Relative to a remote data_root (s3://, http://) is remote too.
        if _is_local(path) and not osp.exists(path):
            yield f'{where}.ann_file', path
    prefix = dataset.get('data_prefix', '') or ''
    prefixes = prefix.items() if isinstance(prefix, dict) else [('', prefix)]
    for key, value in prefixes:
        if _is_local(value):
            path = value if osp.isabs(value) else osp.join(data_root, value)
            if _is_local(path) and not osp.exists(path):
                yield f'{where}.data_prefix{"." + key if key else ""}', path


def _checkpoint_problems(node, where):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in CHECKPOINT_KEYS and _is_local(value) and \
                    not osp.exists(value):
                yield f'{where}.{key}', value
            else:
                yield from _checkpoint_problems(value, f'{where}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _checkpoint_problems(value, f'{where}[{i}]')


def find_missing_paths(cfg, phases=('train', 'val', 'test')):
    """List ``(config key, path)`` pairs whose path does not exist.

    Args:
        cfg (Config | dict): A full OpenMMLab config.
        phases (tuple[str]): Which ``<phase>_dataloader`` entries to check.
    """
    problems = []
    for phase in phases:
        loader = cfg.get(f'{phase}_dataloader')
        if loader:
            problems += _dataset_problems(
                loader.get('dataset'), f'{phase}_dataloader.dataset')
    load_from = cfg.get('load_from')
    if _is_local(load_from) and not osp.exists(load_from):
        problems.append(('load_from', load_from))
    resume = cfg.get('resume')
    if isinstance(resume, str) and _is_local(resume) and \
            not osp.exists(resume):
        problems.append(('resume', resume))
    problems += _checkpoint_problems(cfg.get('model', {}), 'model')
    # Duplicates arise when val and test share one dataloader dict.
    return list(dict.fromkeys(problems))


def check_paths(cfg, phases=('train', 'val', 'test'), config_file=''):
    """Raise ``FileNotFoundError`` naming every missing path at once."""
    problems = find_missing_paths(cfg, phases)
    if problems:
        lines = '\n'.join(f'  {key}: {path}' for key, path in problems)
        source = f' in {config_file}' if config_file else ''
        raise FileNotFoundError(
            f'paths named{source} do not exist:\n{lines}\n'
            'Fix the config or override with --cfg-options.')
