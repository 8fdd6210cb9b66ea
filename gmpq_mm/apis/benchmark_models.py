"""The networks the benchmarks time, built as the configs build them.

Every benchmark in ``tools/analysis/`` compares a quantized network or a
search step against the FP network it comes from. They all build them here,
from mmpretrain's ResNet-18 through the registered gmpq_mm types
(``QuantizedBackbone``, ``MixedPrecisionBackbone``, ``GMPQSearchClassifier``)
and so through the package's own converters, exactly as a config would:
no benchmark carries a network or a layer swap of its own.

``stem`` picks the ResNet-18 of the CIFAR configs (``'cifar'``:
``ResNet_CIFAR``) or of the ImageNet finetunes (``'imagenet'``: ``ResNet``);
``kind`` the backbone: ``'fp'``, ``'w4a4'`` (every conv but the stem at 4
bits) or ``'supernet'`` (every conv but the stem searchable over
``SUPERNET_BITS``).
"""
import os.path as osp
import shutil
import tempfile

KINDS = ('fp', 'w4a4', 'supernet')
SUPERNET_BITS = [2, 3, 4, 6]
_BACKBONES = dict(
    cifar=dict(
        type='ResNet_CIFAR',
        depth=18,
        num_stages=4,
        out_indices=(3, ),
        style='pytorch'),
    imagenet=dict(type='ResNet', depth=18, num_stages=4, out_indices=(3, )))
# Per-channel means / stds of the CIFAR-10 configs and of ImageNet.
PREPROCESSORS = dict(
    cifar=dict(mean=[125.3, 123.0, 113.9], std=[63.0, 62.1, 66.7]),
    imagenet=dict(
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        to_rgb=False))


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f'benchmark model: {name} must be one of '
                         f'{", ".join(allowed)}, got {value!r}')


def backbone_cfg(kind='fp', stem='cifar', **quant_kwargs):
    """Backbone config of ``kind`` on the ResNet-18 of ``stem``.

    Args:
        kind (str): ``'fp'``, ``'w4a4'`` or ``'supernet'``.
        stem (str): ``'cifar'`` or ``'imagenet'``.
        **quant_kwargs: More arguments of the quantized backbone (e.g.
            ``signed=False``, or ``policy=...`` for a ``'w4a4'`` kind,
            which then replaces the uniform 4 bits).

    Returns:
        dict: A config for ``MODELS.build``.
    """
    _check('kind', kind, KINDS)
    _check('stem', stem, tuple(_BACKBONES))
    base = dict(_BACKBONES[stem])
    if kind == 'fp':
        return base
    if kind == 'supernet':
        return dict(
            type='MixedPrecisionBackbone',
            backbone=base,
            w_bits=list(SUPERNET_BITS),
            a_bits=list(SUPERNET_BITS),
            **quant_kwargs)
    bits = {} if 'policy' in quant_kwargs else dict(w_bits=4, a_bits=4)
    return dict(
        type='QuantizedBackbone', backbone=base, **bits, **quant_kwargs)


def classifier_cfg(kind='fp',
                   stem='cifar',
                   num_classes=10,
                   preprocessor=None,
                   **quant_kwargs):
    """``ImageClassifier`` config: :func:`backbone_cfg`, global average
    pooling and a linear head (cross-entropy) of ``num_classes``.

    Args:
        preprocessor (bool | dict, optional): ``True`` adds a
            ``ClsDataPreprocessor`` with ``stem``'s mean and std (for
            ``train_step`` on uint8 batches); a dict is used as given;
            ``None`` leaves it out (a model fed float tensors).
    """
    cfg = dict(
        type='ImageClassifier',
        backbone=backbone_cfg(kind, stem, **quant_kwargs),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(
            type='LinearClsHead',
            num_classes=num_classes,
            in_channels=512,
            loss=dict(type='CrossEntropyLoss')))
    if preprocessor is True:
        preprocessor = dict(
            type='ClsDataPreprocessor',
            num_classes=num_classes,
            **PREPROCESSORS[stem])
    if preprocessor:
        cfg['data_preprocessor'] = preprocessor
    return cfg


def _models():
    from mmengine.registry import init_default_scope

    from gmpq_mm.registry import MODELS
    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    init_default_scope('mmpretrain')
    return MODELS


def build_classifier(kind='fp', stem='cifar', num_classes=10, **kwargs):
    """Build :func:`classifier_cfg` (same arguments) with PyTorch's default
    init (the cost of a step does not depend on the weights)."""
    return _models().build(classifier_cfg(kind, stem, num_classes, **kwargs))


def build_search_model(stem='cifar',
                       num_classes=10,
                       preprocessor=True,
                       teacher_state=None,
                       input_shape=None):
    """A ``GMPQSearchClassifier`` as the search configs build it.

    The w2346a2346 supernet of :func:`backbone_cfg`, the FP ResNet-18 as
    its frozen teacher, the attribution rank loss (weight 40) and the
    complexity loss (weight 3e-4).

    Args:
        stem, num_classes, preprocessor: As for :func:`classifier_cfg`.
        teacher_state (dict, optional): The teacher's ``state_dict``;
            defaults to a freshly initialised FP classifier's. It goes
            through a checkpoint file, as a config's ``teacher_checkpoint``
            does, which is removed once the model has read it.
        input_shape (tuple, optional): ``(C, H, W)`` the BitOPs are counted
            at; defaults to the model's own default.

    Returns:
        nn.Module: The search model (in train mode).
    """
    import torch

    models = _models()
    fp_cfg = classifier_cfg('fp', stem, num_classes)
    cfg = classifier_cfg('supernet', stem, num_classes, preprocessor)
    if teacher_state is None:
        teacher_state = models.build(fp_cfg).state_dict()
    folder = tempfile.mkdtemp(prefix='gmpq_bench_teacher_')
    try:
        ckpt = osp.join(folder, 'teacher.pth')
        torch.save({'state_dict': teacher_state}, ckpt)
        cfg.update(
            type='GMPQSearchClassifier',
            teacher=fp_cfg,
            teacher_checkpoint=ckpt,
            attribution_loss=dict(type='AttributionRankLoss', loss_weight=40.),
            complexity_loss=dict(type='ComplexityLoss', loss_weight=3e-4))
        if input_shape is not None:
            cfg['input_shape'] = tuple(input_shape)
        model = models.build(cfg)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return model.train()
