"""Write a few images of an MNIST-style IDX split as PNG files.

The picture tools (``tools/visualization/vis_attribution.py``) take image
files; the demo data ships as IDX. One image per class is taken, in class
order, so the files show the whole label set. File names carry the index
and the class: ``test0003_Dress.png``.

Example::

    python tools/dataset_converters/idx_to_png.py \
        data_demo/fashion_mnist_subset/t10k-images-idx3-ubyte \
        data_demo/fashion_mnist_subset/t10k-labels-idx1-ubyte \
        --out work_dirs/demo/images --num 4
"""
import argparse
import os
import os.path as osp
import re

import numpy as np
from PIL import Image

from gmpq_mm.utils.idx_file import read_idx

FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                         'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('images', help='IDX images file (N x H x W)')
    parser.add_argument('labels', help='IDX labels file (N)')
    parser.add_argument('--out', required=True, help='folder for the PNGs')
    parser.add_argument(
        '--num',
        type=int,
        default=4,
        help='how many images (one per class, in order)')
    parser.add_argument('--prefix', default='test')
    return parser.parse_args(argv)


def pick_one_per_class(labels: np.ndarray, num: int) -> list:
    """Indices of the first image of each class, classes in order."""
    picks = []
    for label in np.unique(labels):
        picks.append(int(np.flatnonzero(labels == label)[0]))
        if len(picks) == num:
            break
    return picks


def main(argv=None):
    args = parse_args(argv)
    try:
        images, labels = read_idx(args.images), read_idx(args.labels)
    except (OSError, ValueError) as err:
        raise SystemExit(f'error: {err}')
    if images.ndim != 3 or len(images) != len(labels):
        raise SystemExit(f'error: {args.images}: expected N x H x W images '
                         f'matching {len(labels)} labels, got shape '
                         f'{images.shape}')
    os.makedirs(args.out, exist_ok=True)
    for index in pick_one_per_class(labels, args.num):
        label = int(labels[index])
        name = (
            FASHION_MNIST_CLASSES[label]
            if label < len(FASHION_MNIST_CLASSES) else str(label))
        name = re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')
        path = osp.join(args.out, f'{args.prefix}{index:04d}_{name}.png')
        Image.fromarray(images[index]).save(path)
        print(path)


if __name__ == '__main__':
    main()
