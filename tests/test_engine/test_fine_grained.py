"""The five fine-grained search sets, loaded for real (issue 12).

Each set is written as a tiny copy in the on-disk layout mmpretrain's
dataset class reads (its ``.mat`` / ``.txt`` annotation files, struct
arrays as in the official MATLAB files, image folders), and its search
config runs two iterations at the config's 224-pixel resolution (slim
8..64-channel ResNet-18 backbone and teacher; tiny JPEGs, which the
pipelines resize to 224). A copy that lacks a file the class needs stops
``tools/train.py`` before anything is built, naming the file.
"""
import os
import os.path as osp
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image


def _jpeg(path, label, size=(40, 30)):
    os.makedirs(osp.dirname(path), exist_ok=True)
    rng = np.random.RandomState(label)
    colour = rng.randint(0, 256, 3)
    pixels = np.clip(colour + rng.randint(-20, 20, (size[1], size[0], 3)), 0,
                     255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def _savemat(path, **arrays):
    import scipy.io as sio
    os.makedirs(osp.dirname(path), exist_ok=True)
    sio.savemat(path, arrays)


def _cars(root, n_train, n_test):
    """devkit/cars_{train,test...}_annos.mat (1xN struct arrays of bbox,
    class 1-based, fname) + cars_train/ and cars_test/ images."""
    dt = [(k, 'O') for k in ('bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2',
                             'class', 'fname')]
    for split, n, ann in (('train', n_train, 'cars_train_annos.mat'),
                          ('test', n_test, 'cars_test_annos_withlabels.mat')):
        table = np.zeros((1, n), dtype=dt)
        for i in range(n):
            label = i % 3
            name = f'{i + 1:05d}.jpg'
            table[0, i] = tuple(
                np.array([[v]], np.uint16)
                for v in (1, 1, 39, 29, label + 1)) + (np.array([name]), )
            _jpeg(osp.join(root, f'cars_{split}', name), label)
        _savemat(osp.join(root, 'devkit', ann), annotations=table)


def _flowers(root, n_train, n_test):
    """imagelabels.mat (labels 1-based, double), setid.mat (trnid/valid/
    tstid, uint16 as in the official file) and jpg/image_%05d.jpg."""
    total = n_train + 2 + n_test
    labels = np.array([[(i % 3) + 1 for i in range(total)]], np.float64)
    ids = np.arange(1, total + 1)
    _savemat(osp.join(root, 'imagelabels.mat'), labels=labels)
    _savemat(
        osp.join(root, 'setid.mat'),
        trnid=ids[None, :n_train - 2].astype(np.uint16),
        valid=ids[None, n_train - 2:n_train].astype(np.uint16),
        tstid=ids[None, n_train:n_train + n_test].astype(np.uint16))
    for i in ids:
        _jpeg(osp.join(root, 'jpg', f'image_{i:05d}.jpg'), (int(i) - 1) % 3)


def _aircraft(root, n_train, n_test):
    """data/images_variant_{trainval,test}.txt ('<id> <variant name>') and
    data/images/<id>.jpg."""
    from mmpretrain.datasets import FGVCAircraft
    classes = FGVCAircraft.METAINFO['classes']
    for split, n, offset in (('trainval', n_train, 1000000), ('test', n_test,
                                                              2000000)):
        lines = []
        for i in range(n):
            label = (i * 7) % len(classes)  # names with spaces too
            lines.append(f'{offset + i} {classes[label]}')
            _jpeg(osp.join(root, 'data', 'images', f'{offset + i}.jpg'), label)
        path = osp.join(root, 'data', f'images_variant_{split}.txt')
        with open(path, 'w') as f:
            f.write('\n'.join(lines) + '\n')


def _pets(root, n_train, n_test):
    """annotations/{trainval,test}.txt ('<name> <class 1-based> <species>
    <breed id>') and images/<name>.jpg."""
    from mmpretrain.datasets import OxfordIIITPet
    classes = OxfordIIITPet.METAINFO['classes']
    os.makedirs(osp.join(root, 'annotations'))
    for split, n, offset in (('trainval', n_train, 100), ('test', n_test,
                                                          200)):
        lines = []
        for i in range(n):
            label = i % 4
            name = f'{classes[label]}_{offset + i}'
            lines.append(f'{name} {label + 1} 1 {label + 1}')
            _jpeg(osp.join(root, 'images', f'{name}.jpg'), label)
        with open(osp.join(root, 'annotations', f'{split}.txt'), 'w') as f:
            f.write('\n'.join(lines) + '\n')


def _food(root, n_train, n_test):
    """meta/{train,test}.txt ('<class>/<id>') and images/<class>/<id>.jpg."""
    from mmpretrain.datasets import Food101
    classes = Food101.METAINFO['classes']
    os.makedirs(osp.join(root, 'meta'))
    for split, n, offset in (('train', n_train, 1000), ('test', n_test, 2000)):
        lines = []
        for i in range(n):
            label = i % 3
            lines.append(f'{classes[label]}/{offset + i}')
            _jpeg(
                osp.join(root, 'images', classes[label], f'{offset + i}.jpg'),
                label)
        with open(osp.join(root, 'meta', f'{split}.txt'), 'w') as f:
            f.write('\n'.join(lines) + '\n')


# name -> (writer, a file the class needs, relative to the root)
SETS = {
    'cars': (_cars, 'devkit/cars_train_annos.mat'),
    'flowers102': (_flowers, 'setid.mat'),
    'aircraft': (_aircraft, 'data/images_variant_trainval.txt'),
    'pets': (_pets, 'annotations/trainval.txt'),
    'food101': (_food, 'meta/train.txt'),
}
N_TRAIN, N_TEST = 8, 2  # bilevel: 4 weight + 4 arch images, batch 2


def _configs(tmp_path, repo_root, name, data_root):
    """A slim teacher (with its checkpoint) and the search config of
    ``name`` reading ``data_root``: 2 iterations, one validation."""
    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from gmpq_mm.registry import MODELS
    teacher = tmp_path / 'teacher.py'
    teacher.write_text(
        textwrap.dedent(f'''
        _base_ = ['{repo_root}/configs/gmpq/pretrain_r18_{name}.py']
        model = dict(backbone=dict(stem_channels=8, base_channels=8,
                                   init_cfg=None),
                     head=dict(in_channels=64))
    '''))
    init_default_scope('mmpretrain')
    torch.manual_seed(0)
    net = MODELS.build(Config.fromfile(teacher).model.to_dict())
    ckpt = tmp_path / 'teacher.pth'
    torch.save({'state_dict': net.state_dict()}, ckpt)
    loader = ("dict(batch_size=2, num_workers=0, persistent_workers=False, "
              f"dataset=dict(data_root='{data_root}'))")
    cfg = tmp_path / f'search_{name}.py'
    cfg.write_text(
        textwrap.dedent(f'''
        _base_ = ['{repo_root}/configs/gmpq/search_r18_{name}.py']
        model = dict(
            backbone=dict(backbone=dict(stem_channels=8, base_channels=8)),
            head=dict(in_channels=64),
            teacher='{teacher}', teacher_checkpoint='{ckpt}')
        train_dataloader = {loader}
        val_dataloader = {loader}
        test_dataloader = val_dataloader
        train_cfg = dict(max_epochs=1, val_interval=1)
        default_hooks = dict(logger=dict(interval=1))
    '''))
    return cfg


@pytest.mark.parametrize('name', list(SETS))
def test_search_config_runs_on_real_layout(name, tmp_path, repo_root,
                                           run_in_process):
    writer, _ = SETS[name]
    root = tmp_path / name
    writer(str(root), N_TRAIN, N_TEST)
    cfg = _configs(tmp_path, repo_root, name, root)
    work = tmp_path / 'work'
    out = run_in_process(['tools/train.py', cfg, '--work-dir', work],
                         timeout=600).output
    assert 'Epoch(train) [1][2/2]' in out, out[-3000:]
    assert 'loss_attr' in out and 'accuracy/top1' in out
    import json
    policy = json.loads((work / 'policy.json').read_text())
    assert policy['input_shape'] == [3, 224, 224]
    assert len(policy['layers']) == 19


def test_runners_in_one_process_keep_their_own_datasets(
        tmp_path, repo_root, openmmlab_isolation):
    """Two search Runners built one after the other in one process (a
    notebook, the policy study): each loop loads its own config's dataset
    class, and the configs keep dataset configs, not built datasets.
    (Once seen: the pets run after the cars run failed with "'StanfordCars'
    object is not callable".)"""
    from mmengine.config import Config
    from mmengine.runner import Runner
    from mmpretrain.datasets import OxfordIIITPet, StanfordCars

    from gmpq_mm.datasets.sample_seeding import SeededSamples, unwrap_seeded
    from gmpq_mm.engine.hooks import add_exact_resume
    for name, cls in (('cars', StanfordCars), ('pets', OxfordIIITPet)):
        folder = tmp_path / name
        folder.mkdir()
        SETS[name][0](str(folder / 'data'), N_TRAIN, N_TEST)
        cfg = Config.fromfile(
            _configs(folder, repo_root, name, folder / 'data'))
        cfg.work_dir = str(folder / 'work')
        add_exact_resume(cfg)  # as tools/train.py does
        loop = Runner.from_cfg(cfg).train_loop
        for loader in (loop.dataloader, loop.arch_dataloader):
            assert isinstance(loader.dataset, SeededSamples)
            assert type(unwrap_seeded(loader.dataset)) is cls, name
        dataset = unwrap_seeded(cfg.train_dataloader.dataset)
        assert isinstance(dataset, dict), type(dataset)
        assert dataset.type == cls.__name__


@pytest.mark.parametrize('name', list(SETS))
def test_missing_annotation_named_before_start(name, tmp_path, repo_root,
                                               run_in_process):
    writer, needed = SETS[name]
    root = tmp_path / name
    writer(str(root), N_TRAIN, N_TEST)
    os.remove(root / needed)
    cfg = _configs(tmp_path, repo_root, name, root)
    work = tmp_path / 'work'
    result = run_in_process(['tools/train.py', cfg, '--work-dir', work],
                            check=False,
                            timeout=300)
    assert result.returncode != 0
    assert str(root / needed) in result.output, result.tail()
    assert 'Traceback' not in result.output  # a clean message, not a crash
    assert not work.exists()  # stopped before the Runner was built


def test_loaded_samples_match_the_files(tmp_path):
    """What each class reads from the tiny copies: count and labels."""
    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    from mmpretrain.datasets import (FGVCAircraft, Flowers102, Food101,
                                     OxfordIIITPet, StanfordCars)
    expect = {
        'cars': (StanfordCars, 'train', [0, 1, 2, 0, 1, 2, 0, 1]),
        'flowers102': (Flowers102, 'trainval', [0, 1, 2, 0, 1, 2, 0, 1]),
        'aircraft':
        (FGVCAircraft, 'trainval', [(i * 7) % 100 for i in range(8)]),
        'pets': (OxfordIIITPet, 'trainval', [0, 1, 2, 3, 0, 1, 2, 3]),
        'food101': (Food101, 'train', [0, 1, 2, 0, 1, 2, 0, 1]),
    }
    for name, (cls, split, labels) in expect.items():
        root = tmp_path / name
        SETS[name][0](str(root), N_TRAIN, N_TEST)
        dataset = cls(data_root=str(root), split=split)
        assert [
            dataset.get_data_info(i)['gt_label'] for i in range(len(dataset))
        ] == labels, name
        assert all(
            osp.isfile(dataset.get_data_info(i)['img_path'])
            for i in range(len(dataset))), name
