#!/usr/bin/env python
"""Make a small, class-balanced Fashion-MNIST subset for offline demos.

The output folder can be used directly as ``data_root`` of
``mmpretrain.datasets.FashionMNIST`` (mmpretrain 1.2.0) with
``download=False``. That class looks for the *uncompressed* idx files
(``train-images-idx3-ubyte`` etc.; it strips the ``.gz`` suffix of its file
list before checking existence and reading), so the subset is written
uncompressed, in the original IDX format (big-endian magic number and dims).

Example::

    python tools/dataset_converters/make_fashion_mnist_subset.py \
        --src /usr/share/datasets/fashion-mnist \
        --out data_demo/fashion_mnist_subset \
        --train-per-class 500 --test-per-class 100 --seed 0

``--src`` is the folder of the Debian package ``dataset-fashion-mnist``
(``apt-get install dataset-fashion-mnist``), which holds the original
``*-idx?-ubyte.gz`` files of https://github.com/zalandoresearch/fashion-mnist.
"""
import argparse
import hashlib
import os
import os.path as osp
import shutil
import subprocess
import sys

import numpy as np

from gmpq_mm.utils.idx_file import read_idx, write_idx

CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
           'Shirt', 'Sneaker', 'Bag', 'Ankle boot')

# (split, images file, labels file) -- names as in the original release.
SPLITS = (
    ('train', 'train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    ('test', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
)

DEBIAN_PKG = 'dataset-fashion-mnist'
DEBIAN_COPYRIGHT = '/usr/share/doc/dataset-fashion-mnist/copyright'


def select_balanced(labels, per_class, rng):
    """Pick ``per_class`` random indices of every class; return them sorted
    (so the subset keeps the original file order)."""
    chosen = []
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(f'class {c} has only {len(idx)} samples, '
                             f'{per_class} requested')
        chosen.append(rng.choice(idx, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def debian_version(pkg):
    try:
        return subprocess.check_output(
            ['dpkg-query', '-W', '-f=${Version}', pkg],
            stderr=subprocess.DEVNULL,
            text=True).strip() or 'unknown'
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument(
        '--src',
        default='/usr/share/datasets/fashion-mnist',
        help='folder with the original Fashion-MNIST idx files '
        '(.gz or plain)')
    p.add_argument(
        '--out',
        default='data_demo/fashion_mnist_subset',
        help='output folder (used as data_root)')
    p.add_argument('--train-per-class', type=int, default=500)
    p.add_argument('--test-per-class', type=int, default=100)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument(
        '--license-file',
        default=DEBIAN_COPYRIGHT,
        help='licence text copied to OUT/LICENSE')
    return p.parse_args()


def main():
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    per_class = {'train': args.train_per_class, 'test': args.test_per_class}

    stats = {}
    for split, img_name, lbl_name in SPLITS:
        imgs = read_idx(osp.join(args.src, img_name))
        labels = read_idx(osp.join(args.src, lbl_name))
        assert imgs.ndim == 3 and labels.ndim == 1
        assert len(imgs) == len(labels)
        keep = select_balanced(labels, per_class[split], rng)
        sub_imgs, sub_labels = imgs[keep], labels[keep]
        write_idx(osp.join(args.out, img_name), sub_imgs)
        write_idx(osp.join(args.out, lbl_name), sub_labels)
        counts = np.bincount(sub_labels, minlength=len(CLASSES))
        stats[split] = dict(
            total=len(keep),
            source_total=len(labels),
            counts=counts,
            shape=sub_imgs.shape)
        print(f'{split}: {len(keep)} / {len(labels)} images, '
              f'per class {counts.tolist()}')

    if args.license_file and osp.exists(args.license_file):
        shutil.copyfile(args.license_file, osp.join(args.out, 'LICENSE'))
    else:
        print(
            f'WARNING: licence file {args.license_file} not found; '
            'LICENSE not written',
            file=sys.stderr)

    write_readme(args, stats)
    print(f'Wrote {args.out}')


def write_readme(args, stats):
    version = debian_version(DEBIAN_PKG)
    cmd = ('python tools/dataset_converters/make_fashion_mnist_subset.py '
           f'--src {args.src} --out {args.out} '
           f'--train-per-class {args.train_per_class} '
           f'--test-per-class {args.test_per_class} --seed {args.seed}')
    lines = [
        '# Fashion-MNIST demo subset',
        '',
        'A small, class-balanced subset of '
        '[Fashion-MNIST](https://github.com/zalandoresearch/fashion-mnist) '
        '(Zalando Research), for offline demos and tests.',
        '',
        '## Source',
        '',
        '- Dataset: Fashion-MNIST by Zalando Research '
        '(Han Xiao, Kashif Rasul, Roland Vollgraf, 2017), '
        'https://github.com/zalandoresearch/fashion-mnist',
        f'- Obtained from the Debian package `{DEBIAN_PKG}` version '
        f'`{version}` (`apt-get install {DEBIAN_PKG}`), which ships the '
        f'original idx files under `{args.src}`.',
        '',
        '## Licence',
        '',
        'MIT (Expat), Copyright (c) 2017 Zalando SE. The licence text is in '
        '`LICENSE` (copied verbatim from the Debian package\'s '
        f'`{args.license_file}`).',
        '',
        '## How it was made',
        '',
        '```bash',
        cmd,
        '```',
        '',
        'For every class, `--train-per-class` / `--test-per-class` images are '
        'drawn without replacement with `numpy.random.default_rng(seed)` '
        '(train split first, then test); the selected indices are sorted so '
        'the original file order is kept. Pixels and labels are unchanged. '
        'Files are written uncompressed in the original IDX format (same '
        'file names, magic numbers and big-endian dims), because '
        '`mmpretrain.datasets.FashionMNIST` (1.2.0) looks for the '
        'uncompressed names in `data_root`.',
        '',
        '## Contents',
        '',
        '| split | images | source images | image shape |',
        '| --- | --- | --- | --- |',
    ]
    for split, s in stats.items():
        lines.append(f'| {split} | {s["total"]} | {s["source_total"]} | '
                     f'{s["shape"][1]}x{s["shape"][2]} uint8 |')
    lines += [
        '', '| label | class | train | test |', '| --- | --- | --- | --- |'
    ]
    for c, name in enumerate(CLASSES):
        lines.append(f'| {c} | {name} | {stats["train"]["counts"][c]} | '
                     f'{stats["test"]["counts"][c]} |')
    lines += ['', '| file | bytes | sha256 |', '| --- | --- | --- |']
    for _, img_name, lbl_name in SPLITS:
        for name in (img_name, lbl_name):
            path = osp.join(args.out, name)
            lines.append(f'| `{name}` | {osp.getsize(path)} | '
                         f'`{sha256(path)}` |')
    lines += [
        '',
        '## Usage with mmpretrain',
        '',
        '```python',
        'from mmpretrain.datasets import FashionMNIST',
        f"train = FashionMNIST(data_root='{args.out}', split='train',",
        '                     download=False, pipeline=[])',
        f"test = FashionMNIST(data_root='{args.out}', split='test',",
        '                    test_mode=True, download=False, pipeline=[])',
        '```',
        '',
        'Note: in mmpretrain 1.2.0 `MNIST.load_data_list` picks the files '
        'from `test_mode`, not from `split`, so the test split needs '
        '`test_mode=True` as well as `split=\'test\'`.',
        '',
    ]
    with open(osp.join(args.out, 'README.md'), 'w') as f:
        f.write('\n'.join(lines))


if __name__ == '__main__':
    main()
