"""Fail fast on paths a config names but that are not there.

Runs before the Runner is built, so a typo in ``data_root`` or a checkpoint
path costs seconds, not the time to build a model and start an epoch.
"""
import os
import os.path as osp

REMOTE_PREFIXES = ('http://', 'https://', 'torchvision://', 'modelzoo://',
                   'open-mmlab://', 's3://', 'mmcls://', 'mmpretrain://')
# Model-config keys whose string values name files to read.
CHECKPOINT_KEYS = ('checkpoint', 'teacher_checkpoint', 'policy')
# Dataset types that fetch their files when ``download=True``.
DOWNLOADABLE = ('CIFAR10', 'CIFAR100', 'CIFAR10Format', 'CIFAR100Format',
                'MNIST', 'FashionMNIST')


def _is_local(path):
    return isinstance(path,
                      str) and path and not path.startswith(REMOTE_PREFIXES)


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
    may_download = (
        dataset.get('type') in DOWNLOADABLE and dataset.get('download', True))
    if _is_local(data_root) and not osp.exists(data_root):
        if not may_download:
            yield f'{where}.data_root', data_root
        return
    if _is_local(data_root):
        for what, path in _split_problems(dataset, data_root):
            yield f'{where} ({what})', path
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


# Files and folders mmpretrain's split-based datasets read, relative to
# data_root: ``type -> {split: [path, ...]}`` ('*' for every split). A
# tuple holds alternatives (the first that exists is read).
SPLIT_FILES = {
    'StanfordCars': {
        'train': [('cars_annos.mat', 'devkit/cars_train_annos.mat')],
        'test': [('cars_annos.mat', 'devkit/cars_test_annos_withlabels.mat')],
    },
    'Flowers102': {
        '*': ['imagelabels.mat', 'setid.mat', 'jpg']
    },
    'FGVCAircraft': {
        s: [f'data/images_variant_{s}.txt', 'data/images']
        for s in ('train', 'val', 'trainval', 'test')
    },
    'OxfordIIITPet': {
        'trainval': ['annotations/trainval.txt', 'images'],
        'test': ['annotations/test.txt', 'images'],
    },
    'Food101': {
        'train': ['meta/train.txt', 'images'],
        'test': ['meta/test.txt', 'images'],
    },
}
# StanfordCars reads images next to cars_annos.mat, else in these folders.
_CARS_IMAGES = {'train': 'cars_train', 'test': 'cars_test'}


def _split_problems(dataset, data_root):
    """Files a split-based dataset class will read that are missing."""
    kind = str(dataset.get('type', '')).split('.')[-1]
    split = dataset.get('split') or ''
    if kind in ('ImageNet', 'ImageNet21k') and split:
        if dataset.get('ann_file') or dataset.get('data_prefix'):
            return
        folder = osp.join(data_root, split)
        ann = osp.join(data_root, 'meta', f'{split}.txt')
        if not osp.isdir(folder):
            yield 'split folder', folder
        elif not osp.isfile(ann) and not any(entry.is_dir()
                                             for entry in os.scandir(folder)):
            # Without meta/<split>.txt mmpretrain reads one subfolder per
            # class; a flat folder (ImageNet's val images) needs the file.
            yield (f'annotation file: {folder} has no class subfolders, so '
                   f'ImageNet needs meta/{split}.txt'), ann
        return
    table = SPLIT_FILES.get(kind, {})
    wanted = table.get(split, table.get('*', []))
    for entry in wanted:
        options = entry if isinstance(entry, tuple) else (entry, )
        paths = [osp.join(data_root, p) for p in options]
        found = next((p for p in paths if osp.exists(p)), None)
        if found is None:
            yield f'{kind} {split} file', paths[-1]
        elif kind == 'StanfordCars' and found != paths[0]:
            images = osp.join(data_root, _CARS_IMAGES[split])
            if not osp.isdir(images):
                yield f'{kind} {split} folder', images


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


def _last_checkpoint_problems(cfg):
    """Auto-resume reads ``work_dir/last_checkpoint``: when it is there, it
    must name a checkpoint that exists (an empty one would otherwise end in
    'checkpoint file not found: ' with no path at all)."""
    if cfg.get('resume') is not True or cfg.get('load_from') or \
            not cfg.get('work_dir'):
        return []
    pointer = osp.join(cfg.work_dir, 'last_checkpoint')
    if not osp.isfile(pointer):
        return []
    with open(pointer, encoding='utf-8') as f:
        target = f.read().strip()
    if not target:
        return [(f'resume ({pointer} is empty; delete it to start afresh '
                 'or name a checkpoint with --resume PATH)', pointer)]
    if _is_local(target) and not osp.exists(target):
        return [(f'resume (named by {pointer})', target)]
    return []


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
    problems += _last_checkpoint_problems(cfg)
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
