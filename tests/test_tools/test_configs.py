"""Every config under configs/gmpq/ parses; the pretrain models build.

No network and no data: models are built but ``init_weights`` is never
called, so ``init_cfg`` checkpoints (URLs) are not fetched.
"""
import glob
import os.path as osp
import re

import pytest
from mmengine.config import Config

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG_ROOT = osp.join(REPO_ROOT, 'configs', 'gmpq')


def _configs():
    paths = glob.glob(osp.join(CONFIG_ROOT, '**', '*.py'), recursive=True)
    rel = [osp.relpath(p, REPO_ROOT) for p in paths]
    return sorted(p for p in rel if '_base_' not in p.split(osp.sep))


CONFIGS = _configs()
PRETRAIN_CONFIGS = [
    p for p in CONFIGS if osp.basename(p).startswith('pretrain_')
]


def test_configs_found():
    assert 'configs/gmpq/pretrain_r18_cifar10.py' in CONFIGS
    assert PRETRAIN_CONFIGS


_parsed = {}


def load(path):
    """Config.fromfile once per file (imports gmpq_mm via custom_imports)."""
    if path not in _parsed:
        _parsed[path] = Config.fromfile(osp.join(REPO_ROOT, path))
    return _parsed[path]


def _dataset_types(dataset):
    """Dataset ``type``s in a dataset cfg, wrappers included."""
    if not isinstance(dataset, dict):
        return []
    types = [dataset['type']] if 'type' in dataset else []
    types += _dataset_types(dataset.get('dataset'))
    for sub in dataset.get('datasets', []) or []:
        types += _dataset_types(sub)
    return types


@pytest.fixture(scope='module', autouse=True)
def mmpretrain_scope():
    from mmengine.registry import init_default_scope

    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    init_default_scope('mmpretrain')


@pytest.mark.parametrize('path', CONFIGS)
def test_config_parses(path):
    cfg = load(path)
    assert cfg.get('default_scope') == 'mmpretrain'
    assert 'gmpq_mm.register_all' in cfg.custom_imports['imports']
    assert cfg.model.get('type')
    assert cfg.train_dataloader.dataset.get('type')
    assert cfg.get('train_cfg') and cfg.get('optim_wrapper')


@pytest.mark.parametrize('path', CONFIGS)
def test_registered_types(path):
    from mmpretrain.registry import DATASETS, METRICS, MODELS
    cfg = load(path)
    assert MODELS.get(cfg.model.type) is not None, cfg.model.type
    for phase in ('train', 'val', 'test'):
        loader = cfg.get(f'{phase}_dataloader')
        if not loader:
            continue
        for dataset_type in _dataset_types(loader.dataset):
            assert DATASETS.get(dataset_type) is not None, (phase,
                                                            dataset_type)
    for phase in ('val', 'test'):
        evaluator = cfg.get(f'{phase}_evaluator')
        evaluators = evaluator if isinstance(evaluator, list) else [evaluator]
        for item in filter(None, evaluators):
            assert METRICS.get(item['type']) is not None, item['type']


def _model_key(cfg):
    """Pretrain models differing only in head size build the same way."""
    model = cfg.model.to_dict()
    model.get('head', {}).pop('num_classes', None)
    return repr(model)


@pytest.mark.parametrize('path', PRETRAIN_CONFIGS)
def test_pretrain_model_builds(path):
    import torch
    from mmpretrain.registry import MODELS
    cfg = load(path)
    key = _model_key(cfg)
    same = [
        p for p in PRETRAIN_CONFIGS if p < path and _model_key(load(p)) == key
    ]
    if same:
        pytest.skip(f'same model as {same[0]} (but num_classes)')
    model = MODELS.build(cfg.model)
    model.eval()
    num_classes = cfg.model.head.num_classes
    assert model.head.fc.out_features == num_classes
    channels = cfg.model.backbone.get('in_channels', 3)
    size = 32 if 'cifar' in path or 'mnist' in path else 64
    with torch.no_grad():
        out = model(torch.zeros(1, channels, size, size), mode='tensor')
    assert out.shape == (1, num_classes)


SCALE_LINE = re.compile(r'# Scale: (\d+) (GPUs?|CPU process) x (\d+) images, '
                        r'(\d+) epochs\.\n')


@pytest.mark.parametrize('path', CONFIGS)
def test_first_line_states_the_scale(path):
    """The first comment line and the model-zoo table give the config's
    real batch per GPU and epochs; GPUs x batch is its base batch."""
    with open(osp.join(REPO_ROOT, path)) as f:
        first = f.readline()
    match = SCALE_LINE.fullmatch(first)
    assert match, f'{path}: first line {first!r} is not "# Scale: ..."'
    gpus, kind, batch, epochs = match.groups()
    cfg = load(path)
    assert int(batch) == cfg.train_dataloader.batch_size, path
    assert int(epochs) == cfg.train_cfg.max_epochs, path
    base = (cfg.get('auto_scale_lr') or {}).get('base_batch_size')
    if base is not None:
        assert int(gpus) * int(batch) == base, (path, base)
    with open(osp.join(CONFIG_ROOT, 'README.md')) as f:
        zoo = f.read()
    rel = osp.relpath(osp.join(REPO_ROOT, path), CONFIG_ROOT)
    unit = 'CPU' if kind.startswith('CPU') else kind
    row = (f'](./{rel}) | ', f' | {gpus} {unit} x {batch} | '
           f'{int(gpus) * int(batch)} | {epochs} |')
    lines = [
        line for line in zoo.splitlines()
        if row[0] in line and line.startswith('| [')
    ]
    assert any(line.endswith(row[1]) for line in lines), (path, lines)
