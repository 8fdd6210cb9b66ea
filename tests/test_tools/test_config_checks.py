"""gmpq_mm.utils.config_checks (fail fast on missing paths) and
gmpq_mm.datasets.CIFAR10Format (CIFAR files that differ from the release)."""
import logging
import os
import os.path as osp
import pickle
import shutil

import numpy as np
import pytest
from mmengine.config import Config

from gmpq_mm.utils import check_paths, find_missing_paths


def loader(dataset):
    return dict(batch_size=2, dataset=dataset)


def cfg_with(train=None, val=None, test=None, **extra):
    cfg = dict(extra)
    for phase, dataset in (('train', train), ('val', val), ('test', test)):
        if dataset is not None:
            cfg[f'{phase}_dataloader'] = loader(dataset)
    return cfg


@pytest.fixture
def tree(tmp_path):
    """``root/{train/, meta/train.txt}`` plus a checkpoint ``ckpt.pth``."""
    (tmp_path / 'root' / 'train').mkdir(parents=True)
    (tmp_path / 'root' / 'meta').mkdir()
    (tmp_path / 'root' / 'meta' / 'train.txt').write_text('a.jpg 0\n')
    (tmp_path / 'ckpt.pth').write_bytes(b'')
    return tmp_path


# ------------------------------------------------------- dataset entries --
def test_all_present_is_clean(tree):
    root = str(tree / 'root')
    dataset = dict(
        type='CustomDataset',
        data_root=root,
        ann_file='meta/train.txt',
        data_prefix='train')
    cfg = cfg_with(
        train=dataset,
        val=dataset,
        test=dataset,
        load_from=str(tree / 'ckpt.pth'))
    assert find_missing_paths(cfg) == []
    check_paths(cfg)  # does not raise


def test_missing_data_root(tmp_path):
    missing = str(tmp_path / 'nope')
    cfg = cfg_with(
        train=dict(type='ImageNet', data_root=missing, split='train'))
    assert find_missing_paths(cfg) == [('train_dataloader.dataset.data_root',
                                        missing)]


def test_missing_data_root_reported_once_not_its_children(tmp_path):
    """Under a missing data_root, ann_file / data_prefix are not listed."""
    missing = str(tmp_path / 'nope')
    cfg = cfg_with(
        train=dict(
            type='CustomDataset',
            data_root=missing,
            ann_file='meta/train.txt',
            data_prefix='train'))
    assert find_missing_paths(cfg) == [('train_dataloader.dataset.data_root',
                                        missing)]


def test_ann_file_relative_and_absolute(tree):
    root = str(tree / 'root')
    cfg = cfg_with(
        train=dict(
            type='CustomDataset', data_root=root, ann_file='meta/val.txt'),
        val=dict(type='CustomDataset', ann_file=str(tree / 'abs.txt')))
    assert find_missing_paths(cfg) == [
        ('train_dataloader.dataset.ann_file', osp.join(root, 'meta/val.txt')),
        ('val_dataloader.dataset.ann_file', str(tree / 'abs.txt')),
    ]


def test_ann_file_without_data_root(tmp_path):
    cfg = cfg_with(train=dict(type='CustomDataset', ann_file='rel/ann.txt'))
    assert find_missing_paths(cfg) == [('train_dataloader.dataset.ann_file',
                                        'rel/ann.txt')]


def test_data_prefix_str_and_dict(tree):
    root = str(tree / 'root')
    cfg = cfg_with(
        train=dict(type='CustomDataset', data_root=root, data_prefix='val'),
        val=dict(
            type='CocoLike',
            data_root=root,
            data_prefix=dict(img_path='train', seg_map_path='masks')),
        test=dict(
            type='CustomDataset',
            data_prefix=dict(img_path=str(tree / 'abs_imgs'))))
    assert find_missing_paths(cfg) == [
        ('train_dataloader.dataset.data_prefix', osp.join(root, 'val')),
        ('val_dataloader.dataset.data_prefix.seg_map_path',
         osp.join(root, 'masks')),
        ('test_dataloader.dataset.data_prefix.img_path',
         str(tree / 'abs_imgs')),
    ]


def test_empty_and_none_entries_are_ignored():
    cfg = cfg_with(
        train=dict(
            type='CustomDataset',
            data_root='',
            ann_file=None,
            data_prefix=dict(img_path='')))
    cfg['val_dataloader'] = None
    cfg['test_dataloader'] = dict(batch_size=1)  # no dataset key
    assert find_missing_paths(cfg) == []


def test_dataset_wrappers(tmp_path):
    a, b, c = (str(tmp_path / n) for n in 'abc')
    cfg = cfg_with(
        train=dict(
            type='RepeatDataset',
            times=2,
            dataset=dict(type='ImageNet', data_root=a)),
        val=dict(
            type='ConcatDataset',
            datasets=[
                dict(type='ImageNet', data_root=str(tmp_path)),
                dict(
                    type='ClassBalancedDataset',
                    oversample_thr=0.1,
                    dataset=dict(type='ImageNet', data_root=b)),
                dict(type='ImageNet', data_root=c),
            ]))
    assert find_missing_paths(cfg) == [
        ('train_dataloader.dataset.dataset.data_root', a),
        ('val_dataloader.dataset.datasets[1].dataset.data_root', b),
        ('val_dataloader.dataset.datasets[2].data_root', c),
    ]


@pytest.mark.parametrize('dataset_type', [
    'CIFAR10', 'CIFAR100', 'CIFAR10Format', 'CIFAR100Format', 'MNIST',
    'FashionMNIST'
])
def test_downloadable_types(tmp_path, dataset_type):
    missing = str(tmp_path / 'nope')
    # download defaults to True for these types: they fetch the data.
    assert find_missing_paths(
        cfg_with(train=dict(type=dataset_type, data_root=missing))) == []
    assert find_missing_paths(
        cfg_with(
            train=dict(type=dataset_type, data_root=missing,
                       download=True))) == []
    assert find_missing_paths(
        cfg_with(
            train=dict(type=dataset_type, data_root=missing,
                       download=False))) == [
                           ('train_dataloader.dataset.data_root', missing)
                       ]


def test_download_flag_means_nothing_for_other_types(tmp_path):
    missing = str(tmp_path / 'nope')
    cfg = cfg_with(
        train=dict(type='ImageNet', data_root=missing, download=True))
    assert find_missing_paths(cfg) == [('train_dataloader.dataset.data_root',
                                        missing)]


@pytest.mark.parametrize('url', [
    'http://host/data', 'https://host/data', 's3://bucket/cifar',
    'open-mmlab://resnet18', 'torchvision://resnet18', 'mmcls://x',
    'mmpretrain://x', 'modelzoo://x'
])
def test_remote_paths_are_ignored(url):
    cfg = cfg_with(
        train=dict(
            type='ImageNet',
            data_root=url,
            ann_file='meta/t.txt',
            data_prefix='train'),
        val=dict(type='ImageNet', ann_file=url, data_prefix=url),
        load_from=url,
        resume=url,
        model=dict(
            backbone=dict(init_cfg=dict(type='Pretrained', checkpoint=url)),
            teacher_checkpoint=url))
    assert find_missing_paths(cfg) == []


def test_phases_select_dataloaders(tmp_path):
    a, b, c = (str(tmp_path / n) for n in 'abc')
    cfg = cfg_with(
        train=dict(type='ImageNet', data_root=a),
        val=dict(type='ImageNet', data_root=b),
        test=dict(type='ImageNet', data_root=c))
    assert [p for _, p in find_missing_paths(cfg, phases=('test', ))] == [c]
    assert [p for _, p in find_missing_paths(cfg, phases=('train', 'val'))
            ] == [a, b]
    assert len(find_missing_paths(cfg)) == 3


def test_shared_val_test_loader(tmp_path):
    """``test_dataloader = val_dataloader``: one entry per phase, no
    exact duplicates."""
    missing = str(tmp_path / 'nope')
    shared = loader(dict(type='ImageNet', data_root=missing))
    cfg = dict(val_dataloader=shared, test_dataloader=shared)
    problems = find_missing_paths(cfg)
    assert problems == [('val_dataloader.dataset.data_root', missing),
                        ('test_dataloader.dataset.data_root', missing)]
    assert len(set(problems)) == len(problems)


# -------------------------------------------------- checkpoints & model --
def test_load_from_and_resume(tree):
    missing = str(tree / 'missing.pth')
    assert find_missing_paths(dict(load_from=missing)) == [('load_from',
                                                            missing)]
    assert find_missing_paths(dict(load_from=None, resume=True)) == []
    assert find_missing_paths(dict(resume=False)) == []
    assert find_missing_paths(dict(resume=missing)) == [('resume', missing)]
    assert find_missing_paths(
        dict(load_from=str(tree / 'ckpt.pth'), resume=True)) == []


def test_model_checkpoint_keys(tree):
    missing = str(tree / 'missing.pth')
    present = str(tree / 'ckpt.pth')
    model = dict(
        type='GMPQSearchClassifier',
        backbone=dict(
            type='MixedPrecisionBackbone',
            backbone=dict(
                type='ResNet',
                init_cfg=dict(type='Pretrained', checkpoint=missing)),
            policy=str(tree / 'policy.json')),
        head=dict(init_cfg=[
            dict(type='Normal', layer='Linear', std=0.01),
            dict(type='Pretrained', checkpoint=missing, prefix='head'),
            dict(type='Pretrained', checkpoint=present),
        ]),
        teacher='configs/gmpq/pretrain_r18_cifar10.py',
        teacher_checkpoint=missing)
    assert find_missing_paths(dict(model=model)) == [
        ('model.backbone.backbone.init_cfg.checkpoint', missing),
        ('model.backbone.policy', str(tree / 'policy.json')),
        ('model.head.init_cfg[1].checkpoint', missing),
        ('model.teacher_checkpoint', missing),
    ]


def test_non_path_values_under_checkpoint_keys():
    """Only strings are paths (e.g. ``policy=dict(...)`` inline)."""
    model = dict(
        policy=dict(w_bits=[4, 4]),
        checkpoint=None,
        backbone=dict(policy=[4, 4]))
    assert find_missing_paths(dict(model=model)) == []


def test_config_object_and_check_paths_message(tmp_path):
    missing_root = str(tmp_path / 'data')
    missing_ckpt = str(tmp_path / 'w.pth')
    cfg = Config(
        cfg_with(
            train=dict(type='ImageNet', data_root=missing_root),
            load_from=missing_ckpt))
    assert find_missing_paths(cfg) == [
        ('train_dataloader.dataset.data_root', missing_root),
        ('load_from', missing_ckpt),
    ]
    with pytest.raises(FileNotFoundError) as info:
        check_paths(cfg, config_file='configs/x.py')
    message = str(info.value)
    assert 'configs/x.py' in message
    assert f'train_dataloader.dataset.data_root: {missing_root}' in message
    assert f'load_from: {missing_ckpt}' in message
    assert '--cfg-options' in message


# ------------------------------------------------------------ CIFAR10Format --
class _Records(logging.Handler):

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def mm_log():
    """Messages logged through mmengine's current MMLogger meanwhile."""
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    handler = _Records()
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_cifar10format_loads_fixture(cifar10_root, mm_log):
    from mmpretrain.registry import DATASETS

    from gmpq_mm.datasets import CIFAR10Format
    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    train = DATASETS.build(
        dict(
            type='CIFAR10Format',
            data_root=cifar10_root,
            split='train',
            download=False))
    assert isinstance(train, CIFAR10Format)
    assert len(train) == 40
    test = CIFAR10Format(
        data_root=cifar10_root, split='test', download=False, test_mode=True)
    assert len(test) == 10
    assert len(train.metainfo['classes']) == 10
    # md5 differs from the official files: a warning naming them, no error.
    md5 = [m for m in mm_log if 'differ from the official release' in m]
    assert len(md5) == 2, mm_log
    assert 'data_batch_1' in md5[0] and 'test_batch' in md5[0]

    # Same samples, labels and HWC layout as the pickles on disk.
    folder = osp.join(cifar10_root, 'cifar-10-batches-py')
    with open(osp.join(folder, 'data_batch_1'), 'rb') as f:
        batch = pickle.load(f, encoding='latin1')
    first = train.get_data_info(0)
    assert first['gt_label'] == batch['labels'][0]
    expected = batch['data'][0].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(first['img'], expected)
    labels = [train.get_data_info(i)['gt_label'] for i in range(len(train))]
    assert sorted(set(labels)) == list(range(10))
    sample = train[0]  # the default (empty) pipeline
    assert sample['img'].shape == (32, 32, 3)


def test_cifar10format_missing_folder(tmp_path):
    from gmpq_mm.datasets import CIFAR10Format
    with pytest.raises(FileNotFoundError) as info:
        CIFAR10Format(data_root=str(tmp_path), split='train', download=False)
    expected = osp.join(str(tmp_path), 'cifar-10-batches-py', 'data_batch_1')
    assert expected in str(info.value)
    assert 'download=True' in str(info.value)


def test_cifar10format_missing_one_file(tmp_path, cifar10_root):
    from gmpq_mm.datasets import CIFAR10Format
    root = tmp_path / 'cifar'
    shutil.copytree(cifar10_root, root)
    (root / 'cifar-10-batches-py' / 'test_batch').unlink()
    with pytest.raises(FileNotFoundError, match='test_batch'):
        CIFAR10Format(data_root=str(root), split='train', download=False)


def test_cifar10format_meta_file(tmp_path, cifar10_root):
    """Without class names in metainfo they come from batches.meta."""
    from gmpq_mm.datasets import CIFAR10Format

    class NoNames(CIFAR10Format):
        METAINFO = {}

    dataset = NoNames(data_root=cifar10_root, split='test', download=False)
    assert dataset.metainfo['classes'][:2] == ['airplane', 'automobile']

    root = tmp_path / 'cifar'
    shutil.copytree(cifar10_root, root)
    (root / 'cifar-10-batches-py' / 'batches.meta').unlink()
    with pytest.raises(FileNotFoundError, match='batches.meta'):
        NoNames(data_root=str(root), split='test', download=False)


# ---- strict (allow-list) reading of CIFAR files (issue 12) ------------------
class _Payload:
    """Unpickling this calls ``open(marker, 'w')``: code run by a data
    file, harmless but visible."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


@pytest.mark.parametrize('strict', ['0', '1', None])
def test_cifar_payload_never_runs(tmp_path, cifar10_root, monkeypatch, strict):
    from gmpq_mm.datasets import CIFAR10Format
    if strict is None:
        monkeypatch.delenv('GMPQ_MM_STRICT_LOAD', raising=False)
    else:
        monkeypatch.setenv('GMPQ_MM_STRICT_LOAD', strict)
    root = tmp_path / 'cifar'
    shutil.copytree(cifar10_root, root)
    marker = tmp_path / 'payload_ran'
    bad = root / 'cifar-10-batches-py' / 'data_batch_2'
    with open(bad, 'wb') as f:
        pickle.dump({'data': _Payload(str(marker)), 'labels': [0]}, f)
    with pytest.raises(pickle.UnpicklingError) as info:
        CIFAR10Format(data_root=str(root), split='train', download=False)
    assert str(bad) in str(info.value)
    assert 'builtins' in str(info.value) or 'io' in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_cifar_python3_reexport_loads(tmp_path, cifar10_root, protocol):
    """Files pickled by Python 3 (bytes via _codecs at protocol 2, numpy's
    out-of-band buffers at 5) are still plain data."""
    from gmpq_mm.datasets import CIFAR10Format
    root = tmp_path / 'cifar'
    shutil.copytree(cifar10_root, root)
    folder = root / 'cifar-10-batches-py'
    with open(folder / 'test_batch', 'rb') as f:
        batch = pickle.load(f, encoding='bytes')
    with open(folder / 'test_batch', 'wb') as f:
        pickle.dump(batch, f, protocol=protocol)
    test = CIFAR10Format(data_root=str(root), split='test', download=False)
    assert len(test) == 10
    np.testing.assert_array_equal(
        test.get_data_info(3)['img'],
        batch[b'data'][3].reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar_truncated_file_named(tmp_path, cifar10_root):
    from gmpq_mm.datasets import CIFAR10Format
    root = tmp_path / 'cifar'
    shutil.copytree(cifar10_root, root)
    bad = root / 'cifar-10-batches-py' / 'test_batch'
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(pickle.UnpicklingError, match=str(bad)):
        CIFAR10Format(data_root=str(root), split='test', download=False)


def test_cifar_root_typo_not_created(tmp_path, monkeypatch):
    """download=True on a mistyped root: the failed fetch leaves no folder."""
    import mmpretrain.datasets.utils as utils

    from gmpq_mm.datasets import CIFAR10Format

    def offline(url, root, **kwargs):
        os.makedirs(root, exist_ok=True)  # as the real one does first
        raise OSError('network unreachable')

    monkeypatch.setattr(utils, 'download_and_extract_archive', offline)
    typo = tmp_path / 'data' / 'cifr10'
    with pytest.raises(FileNotFoundError, match='network unreachable'):
        CIFAR10Format(data_root=str(typo), split='train', download=True)
    assert not typo.exists()
