"""The study's data: IDX files of one class split, resized and renumbered,
and the up-front check of the whole Fashion-MNIST a preset may need."""
import os
import os.path as osp

import numpy as np

from gmpq_mm.utils.idx_file import open_idx, read_idx, write_idx
from .presets import DATA, FULL_FASHION_MNIST, SETTINGS, SPLITS

__all__ = [
    'write_split', 'write_study_data', 'split_source', 'check_full_data',
    'FILES'
]

# (images, labels) of each part, as the original release names them
FILES = dict(
    train=('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    t10k=('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'))


def write_split(out_dir,
                split,
                resolution,
                train_limit,
                test_limit,
                source=DATA):
    """Write ``train-*`` / ``t10k-*`` IDX files of ``split`` (a key of
    :data:`SPLITS`) from the IDX folder ``source`` (plain or ``.gz``
    files) to ``out_dir``: the split's classes only, labels renumbered
    from 0, the first ``train_limit`` / ``test_limit`` images (all when
    None), resized to ``resolution`` px (antialiased bilinear)."""
    import torch
    import torch.nn.functional as F

    os.makedirs(out_dir, exist_ok=True)
    keep = SPLITS[split]
    for prefix, limit in (('train', train_limit), ('t10k', test_limit)):
        image_file, label_file = FILES[prefix]
        images = read_idx(osp.join(source, image_file))
        labels = read_idx(osp.join(source, label_file)).astype(np.int64)
        mask = np.isin(labels, keep)
        images, labels = images[mask], labels[mask] - keep[0]
        if limit:
            images, labels = images[:limit], labels[:limit]
        if resolution != images.shape[-1]:
            images = F.interpolate(
                torch.from_numpy(images.copy())[:, None].float(),
                size=(resolution, resolution),
                mode='bilinear',
                antialias=True,
                align_corners=False)[:, 0].round().clamp(0, 255).byte()
            images = images.numpy()
        write_idx(osp.join(out_dir, image_file), images)
        write_idx(osp.join(out_dir, label_file), labels.astype(np.uint8))


def split_source(study, split):
    """The IDX folder ``split`` is cut from."""
    return study['full_data']['root'] if split == 'full' else DATA


def study_splits(study):
    """The splits the study's settings use, plus the subset's three (a
    diagnostics run may take any setting of a study's work dir)."""
    used = {s for name in study['settings'] for s in SETTINGS[name]}
    return [s for s in SPLITS if s in used or s != 'full']


def write_study_data(study):
    """Write ``WORK_DIR/data/<split>`` for every split the study uses."""
    for split in study_splits(study):
        write_split(
            osp.join(study['work_dir'], 'data', split), split,
            study['resolution'], study['train_limit'], study['test_limit'],
            split_source(study, split))


def _header(path):
    """``dims`` of the IDX file ``path`` (plain or .gz) from its header."""
    with open_idx(path) as f:
        head = f.read(4)
        if len(head) < 4 or head[:3] != b'\x00\x00\x08':
            raise ValueError('not an unsigned-byte IDX file')
        return [int.from_bytes(f.read(4), 'big') for _ in range(head[3])]


def check_full_data(study):
    """If a setting of ``study`` finetunes on the whole Fashion-MNIST,
    check its four IDX files (plain or ``.gz``) in ``full_data['root']``:
    present, 28x28 images, as many labels as images, and the preset's
    ``train`` / ``test`` counts. Raises one line naming the file and how
    to get it; reads only the headers."""
    if not any(SETTINGS[s][1] == 'full' for s in study['settings']):
        return
    if 'full_data' not in study:
        raise ValueError(f"preset {study.get('preset')!r} has no full_data: "
                         'the small_to_large setting needs the whole '
                         'Fashion-MNIST (use the small_to_large preset)')
    full = study['full_data']
    root = full['root']
    hint = ('install it with `apt-get install dataset-fashion-mnist` '
            f'(Debian puts it in {FULL_FASHION_MNIST}) or pass --full-data '
            'DIR (a folder of the original idx files)')
    for prefix, count in (('train', full['train']), ('t10k', full['test'])):
        dims = {}
        for kind, name in zip(('images', 'labels'), FILES[prefix]):
            path = osp.join(root, name)
            try:
                dims[kind] = _header(path)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f'full Fashion-MNIST: {path}[.gz] not found; {hint}')
            except (OSError, ValueError) as e:
                raise ValueError(f'full Fashion-MNIST: {path}[.gz]: {e}')
        images, labels = dims['images'], dims['labels']
        if len(images) != 3 or images[1:] != [28, 28] or \
                labels != images[:1] or images[0] != count:
            raise ValueError(
                f'full Fashion-MNIST: {osp.join(root, FILES[prefix][0])}'
                f'[.gz] holds images {images} and labels {labels}; expected '
                f'[{count}, 28, 28] and [{count}]')
