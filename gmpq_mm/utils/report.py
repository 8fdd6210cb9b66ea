"""Complexity figures (MACs, BitOPs, size, compression) of a built model.

Used by ``tools/test.py`` (after the metrics) and
``tools/analysis/complexity.py``. The counting itself lives in floor 1
(:mod:`gmpq_mm.quantization.complexity`); this module only finds the part of
a classifier to count (backbone + neck + head, never a teacher or a loss) and
the input shape a config feeds it.

Input shape, in this order:

1. the ``input_shape`` argument (``(C, H, W)``, or ``(H, W)`` with the
   channels of the stem conv);
2. ``cfg.complexity_input_shape`` (same forms), else the model's own
   ``input_shape`` setting (``GMPQSearchClassifier``'s);
3. the last size-setting transform of the test pipeline (``CenterCrop``,
   ``Resize``, ``RandomResizedCrop`` ...), channels from the stem;
4. the test dataset type: CIFAR-10/100 -> 32x32, (Fashion-)MNIST -> 28x28;
5. ``224 x 224``.

The pipeline comes before the dataset type because it is what the network
really sees (a CIFAR config that resizes to 224 is measured at 224).
"""
import numbers
import warnings
from typing import Mapping, Optional, Sequence, Tuple

from torch import nn

from gmpq_mm.quantization.complexity import complexity_report
from gmpq_mm.utils.model import unwrap_model

__all__ = [
    'model_complexity', 'infer_input_shape', 'countable_model',
    'stem_channels', 'summarize_report'
]

GIGA = 1e9
DEFAULT_HW = (224, 224)
# Dataset type -> (C, H, W) of its images.
DATASET_SHAPES = {
    'CIFAR10': (3, 32, 32),
    'CIFAR100': (3, 32, 32),
    'CIFAR10Format': (3, 32, 32),
    'CIFAR100Format': (3, 32, 32),
    'MNIST': (1, 28, 28),
    'FashionMNIST': (1, 28, 28),
}
# Transform type -> (argument, order of a pair). mmcv's transforms take
# (w, h); mmpretrain's random crops take (h, w).
SIZE_TRANSFORMS = {
    'CenterCrop': ('crop_size', 'wh'),
    'Resize': ('scale', 'wh'),
    'ResizeEdge': ('scale', 'wh'),
    'EfficientNetCenterCrop': ('crop_size', 'wh'),
    'RandomCrop': ('crop_size', 'hw'),
    'RandomResizedCrop': ('scale', 'hw'),
    'EfficientNetRandomCrop': ('scale', 'hw'),
}


class _FeatureForward(nn.Module):
    """``head(neck(backbone(x)))``: the deployed part of a classifier.

    Holds the classifier's own submodules (no copy), under their names in
    the classifier, so the report's layer names read ``backbone.layer1...``.
    """

    def __init__(self, backbone, neck=None, head=None):
        super().__init__()
        self.backbone = backbone
        if neck is not None:
            self.neck = neck
        if head is not None:
            self.head = head

    def forward(self, x):
        x = self.backbone(x)
        if getattr(self, 'neck', None) is not None:
            x = self.neck(x)
        if getattr(self, 'head', None) is not None:
            x = self.head(x)
        return x


def countable_model(model: nn.Module,
                    with_head: bool = True) -> Optional[nn.Module]:
    """The backbone (+ neck + head) of ``model`` as one module, or None.

    ``model`` may be wrapped in (MM)DistributedDataParallel; None if it
    has no ``backbone`` module.
    """
    model = unwrap_model(model)
    backbone = getattr(model, 'backbone', None)
    if not isinstance(backbone, nn.Module):
        return None
    neck = getattr(model, 'neck', None)
    head = getattr(model, 'head', None) if with_head else None
    neck = neck if isinstance(neck, nn.Module) else None
    head = head if isinstance(head, nn.Module) else None
    return _FeatureForward(backbone, neck, head)


def stem_channels(model: nn.Module) -> Optional[int]:
    """Input channels of the first conv of ``model`` (None if it has none)."""
    for module in unwrap_model(model).modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return int(module.in_channels)
    return None


def _cfg_get(cfg, key, default=None):
    if cfg is None:
        return default
    try:
        return cfg.get(key, default)
    except AttributeError:
        return getattr(cfg, key, default)


def _as_hw(size, order: str) -> Optional[Tuple[int, int]]:
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        return int(size), int(size)
    if (isinstance(size, Sequence) and not isinstance(size, str)
            and len(size) == 2
            and all(isinstance(s, numbers.Integral) for s in size)):
        a, b = int(size[0]), int(size[1])
        return (b, a) if order == 'wh' else (a, b)
    return None


def _base_dataset(dataset):
    """The innermost dataset config of dataset wrappers."""
    while isinstance(dataset, Mapping):
        if isinstance(dataset.get('dataset'), Mapping):
            dataset = dataset['dataset']
        elif dataset.get('datasets'):
            dataset = dataset['datasets'][0]
        else:
            break
    return dataset if isinstance(dataset, Mapping) else None


def _pipeline_hw(pipeline) -> Optional[Tuple[int, int]]:
    hw = None
    for transform in pipeline or []:
        if not isinstance(transform, Mapping):
            continue
        ttype = str(transform.get('type', '')).rpartition('.')[2]
        if ttype in SIZE_TRANSFORMS:
            key, order = SIZE_TRANSFORMS[ttype]
            found = _as_hw(transform.get(key), order)
            hw = found or hw
    return hw


def _complete(shape, channels) -> Tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        return (channels or 3, ) + shape
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise ValueError(f'input shape must be (C, H, W) or (H, W) of '
                         f'positive ints, got {shape}')
    return shape


def infer_input_shape(
        cfg=None,
        model: Optional[nn.Module] = None,
        input_shape: Optional[Sequence[int]] = None) -> Tuple[int, int, int]:
    """The ``(C, H, W)`` a config's test data has (see the module doc)."""
    channels = stem_channels(model) if model is not None else None
    if input_shape is not None:
        return _complete(input_shape, channels)
    explicit = _cfg_get(cfg, 'complexity_input_shape')
    if explicit is None:
        model_cfg = _cfg_get(cfg, 'model')
        if isinstance(model_cfg, Mapping):
            explicit = model_cfg.get('input_shape')
    if explicit is not None:
        return _complete(explicit, channels)
    for key in ('test_dataloader', 'val_dataloader', 'train_dataloader'):
        loader = _cfg_get(cfg, key)
        if not isinstance(loader, Mapping):
            continue
        dataset = _base_dataset(loader.get('dataset'))
        if dataset is None:
            continue
        outer = loader.get('dataset')
        # A wrapper may carry the pipeline; the innermost one otherwise.
        pipeline = (
            outer.get('pipeline') if isinstance(outer, Mapping)
            and outer.get('pipeline') else dataset.get('pipeline'))
        hw = _pipeline_hw(pipeline)
        if hw is not None:
            return (channels or 3, ) + hw
        dtype = str(dataset.get('type', '')).rpartition('.')[2]
        if dtype in DATASET_SHAPES:
            c, h, w = DATASET_SHAPES[dtype]
            return (channels or c, h, w)
        break  # the first dataloader found decides
    return (channels or 3, ) + DEFAULT_HW


def summarize_report(report: Mapping) -> dict:
    """The JSON-able summary of a ``complexity_report`` (BitOPs / MACs in G,
    sizes in MB, per-layer rows kept as they are)."""
    t = report['totals']
    return dict(
        input_shape=list(report['input_shape']),
        macs=t['macs'] / GIGA,
        quantized_macs=t['quantized_macs'] / GIGA,
        bitops_quantized=t['bitops_quantized'] / GIGA,
        bitops_total=t['bitops_total'] / GIGA,
        fp_bitops_quantized=t['fp_bitops_quantized'] / GIGA,
        fp_bitops_total=t['fp_bitops_total'] / GIGA,
        compression=t['compression'],
        compression_quantized=t['compression_quantized'],
        size_mb=t['size_mb'],
        fp_size_mb=t['fp_size_mb'],
        mean_w_bits=t['mean_w_bits'],
        mean_a_bits=t['mean_a_bits'],
        num_quantized=t['num_quantized'],
        units=dict(macs='G (1e9)', bitops='G (1e9)', size='MB (1e6 bytes)'),
        layers=[dict(row) for row in report['layers']])


def model_complexity(model: nn.Module,
                     cfg=None,
                     input_shape: Optional[Sequence[int]] = None,
                     strict: bool = False) -> Optional[dict]:
    """MACs, BitOPs, size and compression of a classifier, JSON-able.

    Counts ``head(neck(backbone(x)))`` (a search classifier's teacher and
    losses are left out) with one forward of a batch of one, in eval mode
    under no_grad; every submodule's training flag is restored after. No
    copy of the model is made.

    Args:
        model: An mmpretrain ``ImageClassifier`` (or anything with a
            ``backbone``), possibly wrapped in DDP.
        cfg: The config (``Config`` or dict), for the input shape.
        input_shape: ``(C, H, W)`` or ``(H, W)``; overrides the config.
        strict: Raise instead of warning and returning None when the model
            cannot be counted.

    Returns:
        dict | None: ``macs``, ``bitops_quantized``, ``bitops_total`` (G,
        floats), ``size_mb``, ``fp_size_mb``, ``compression`` (whole
        network), ``compression_quantized`` (None without quantized
        layers), ``mean_w_bits`` / ``mean_a_bits``, ``num_quantized``,
        ``input_shape`` and the per-layer ``layers``. A full-precision
        model gets its FP figures (compression 1). None if the model has no
        backbone or its forward fails (a warning says why).
    """
    net = countable_model(model)
    if net is None:
        msg = (f'{type(unwrap_model(model)).__name__} has no backbone: no '
               f'complexity report')
        if strict:
            raise ValueError(msg)
        warnings.warn(msg)
        return None
    shape = infer_input_shape(cfg, net, input_shape)
    try:
        try:
            report = complexity_report(net, shape)
        except Exception as head_error:  # noqa: BLE001
            # Some heads need more than features (e.g. data samples).
            net = countable_model(model, with_head=False)
            try:
                report = complexity_report(net, shape)
            except Exception:
                raise head_error from None
            warnings.warn(f'complexity counted without the head: its '
                          f'forward failed ({head_error})')
    except Exception as err:  # noqa: BLE001
        if strict:
            raise
        warnings.warn(f'no complexity report at input shape {shape}: '
                      f'{type(err).__name__}: {err}')
        return None
    return summarize_report(report)
