"""Images of a config's dataset as the ONNX model reads them.

The exported model takes normalised images ``(N, C, H, W)``: this module
runs a config's dataset pipeline and the model's data preprocessor (mean /
std) to produce them, for the ranges of the integer graph's 8-bit points
(:func:`calibration_images`) and for the accuracy of an ONNX file on the
test set (``tools/deploy/test_onnx.py``).
"""
import copy
from typing import Iterator, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ['dataset_batches', 'calibration_images']


def _loader(cfg, split: str, pipeline_of: str, batch_size: int):
    from mmengine.runner import Runner
    key = f'{split}_dataloader'
    if cfg.get(key) is None:
        raise ValueError(f'the config has no {key}')
    loader_cfg = copy.deepcopy(cfg.get(key))
    loader_cfg = loader_cfg.to_dict() if hasattr(loader_cfg, 'to_dict') \
        else dict(loader_cfg)
    if pipeline_of != split:
        other = cfg.get(f'{pipeline_of}_dataloader')
        loader_cfg['dataset']['pipeline'] = copy.deepcopy(
            other['dataset']['pipeline'])
    loader_cfg.update(
        batch_size=batch_size, num_workers=0, persistent_workers=False)
    loader_cfg['sampler'] = dict(type='DefaultSampler', shuffle=False)
    return Runner.build_dataloader(loader_cfg, seed=0)


def dataset_batches(
        cfg,
        model: nn.Module,
        split: str = 'test',
        pipeline_of: str = None,
        batch_size: int = 64,
        limit: int = None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """``(images, labels)`` batches of the config's ``split`` dataloader,
    images normalised by ``model.data_preprocessor``, labels as ints.

    Args:
        pipeline_of: Use this split's pipeline (default ``split``'s), e.g.
            ``'test'`` to read training images without augmentation.
        limit: Stop after this many images.
    """
    loader = _loader(cfg, split, pipeline_of or split, batch_size)
    seen = 0
    for data in loader:
        with torch.no_grad():
            data = model.data_preprocessor(data, False)
        images = data['inputs'].float().numpy()
        labels = np.array([int(s.gt_label[0]) for s in data['data_samples']],
                          np.int64)
        if limit is not None and seen + len(images) > limit:
            images, labels = images[:limit - seen], labels[:limit - seen]
        seen += len(images)
        yield images, labels
        if limit is not None and seen >= limit:
            return


def calibration_images(cfg, model: nn.Module, num: int = 64) -> np.ndarray:
    """The first ``num`` training images, through the test pipeline (no
    augmentation), normalised: the integer graph's calibration inputs.

    Raises:
        ValueError / FileNotFoundError / others: when the config's training
        data cannot be read (the caller decides what to fall back to).
    """
    batches = list(
        dataset_batches(
            cfg, model, 'train', pipeline_of='test', limit=int(num)))
    if not batches:
        raise ValueError('the training set is empty')
    return np.concatenate([b[0] for b in batches])
