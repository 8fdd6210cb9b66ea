"""The study's data: IDX files of one class split, resized and renumbered."""
import os
import os.path as osp

import numpy as np

from .presets import DATA, SPLITS

__all__ = ['write_split']


def write_split(out_dir,
                split,
                resolution,
                train_limit,
                test_limit,
                source=DATA):
    """Write ``train-*`` / ``t10k-*`` IDX files of ``split`` (a key of
    :data:`SPLITS`) from the IDX folder ``source`` to ``out_dir``: the
    split's classes only, labels renumbered from 0, the first
    ``train_limit`` / ``test_limit`` images (all when None), resized
    to ``resolution`` px (antialiased bilinear)."""
    import torch
    import torch.nn.functional as F
    from mmpretrain.datasets.mnist import read_image_file, read_label_file

    os.makedirs(out_dir, exist_ok=True)
    keep = SPLITS[split]
    for prefix, limit in (('train', train_limit), ('t10k', test_limit)):
        images = read_image_file(
            osp.join(source, f'{prefix}-images-idx3-ubyte'))
        labels = read_label_file(
            osp.join(source, f'{prefix}-labels-idx1-ubyte'))
        mask = torch.zeros_like(labels, dtype=torch.bool)
        for c in keep:
            mask |= labels == c
        images, labels = images[mask], labels[mask] - keep[0]
        if limit:
            images, labels = images[:limit], labels[:limit]
        if resolution != images.shape[-1]:
            images = F.interpolate(
                images[:, None].float(),
                size=(resolution, resolution),
                mode='bilinear',
                antialias=True,
                align_corners=False)[:, 0].round().clamp(0, 255).byte()
        n, h, w = images.shape
        with open(osp.join(out_dir, f'{prefix}-images-idx3-ubyte'), 'wb') as f:
            f.write((2051).to_bytes(4, 'big') + n.to_bytes(4, 'big') +
                    h.to_bytes(4, 'big') + w.to_bytes(4, 'big'))
            f.write(images.numpy().tobytes())
        with open(osp.join(out_dir, f'{prefix}-labels-idx1-ubyte'), 'wb') as f:
            f.write((2049).to_bytes(4, 'big') + n.to_bytes(4, 'big'))
            f.write(labels.numpy().astype(np.uint8).tobytes())
