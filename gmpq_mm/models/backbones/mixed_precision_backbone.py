"""``MixedPrecisionBackbone``: any mmpretrain CNN turned into a GMPQ supernet.

A builder rather than a wrapper class: it builds the inner backbone and swaps
its layers in place, so the result keeps the backbone's own class, forward,
``train()`` (frozen stages, norm_eval) and ``init_cfg``, and -- what matters
most -- its module and parameter names. An FP checkpoint therefore loads
as is, and a policy keyed ``layer1.0.conv1`` means the same layer in every
network that shares mmpretrain's names (CIFAR and ImageNet stems alike).
"""
import torch.nn as nn

from gmpq_mm.quantization.convert import select_layers, to_mixed_precision
from gmpq_mm.registry import MODELS


def stem_in_channels(model):
    """Input channels of the first conv (for the probe batch)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise ValueError(f'{type(model).__name__} has no Conv2d to quantize')


def build_and_select(backbone, include, exclude):
    """Build the inner backbone and choose the layers to quantize."""
    model = MODELS.build(backbone) if isinstance(backbone, dict) else backbone
    names = select_layers(model, include=include, exclude=exclude)
    return model, names


@MODELS.register_module()
def MixedPrecisionBackbone(backbone,
                           w_bits=(2, 3, 4, 6),
                           a_bits=(2, 3, 4, 6),
                           include=None,
                           exclude=None,
                           signed='auto',
                           init_range=6.0,
                           alpha_init=0.01,
                           per_channel=False):
    """Build ``backbone`` with searchable bit widths in its convs.

    Args:
        backbone (dict | nn.Module): An mmpretrain backbone config, e.g.
            ``dict(type='ResNet_CIFAR', depth=18)``.
        w_bits (Sequence[int]): Weight bit candidates ``B_w``.
        a_bits (Sequence[int]): Activation bit candidates ``B_a``.
        include / exclude (list[str], optional): fnmatch patterns on module
            names overriding the default choice (every conv but the stem).
        signed (bool | str | dict): Signed activation quantizers; ``'auto'``
            gives them to layers whose input can be negative (found with one
            probe forward), e.g. MobileNetV2's linear bottlenecks.
        init_range (float): Initial PACT range ``r`` (6.0, as the paper).
        alpha_init (float): Initial architecture logits (0.01: uniform).
        per_channel (bool): Per-output-channel weight ranges.

    Returns:
        nn.Module: The backbone, its chosen layers now
        ``MixedPrecisionConv2d``.
    """
    model, names = build_and_select(backbone, include, exclude)
    return to_mixed_precision(
        model,
        w_bits,
        a_bits,
        names=names,
        signed=signed,
        input_shape=(stem_in_channels(model), 64, 64),
        init_range=init_range,
        alpha_init=alpha_init,
        per_channel=per_channel)
