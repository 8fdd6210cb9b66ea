"""MobileNetV2 with the 8-bit requantization points of an integer runtime.

In mmpretrain's ``MobileNetV2`` an inverted residual block ends with a
linear (no activation) projection, and a block with ``use_res_connect``
adds its input. onnxruntime's integer graph
(:mod:`gmpq_mm.deploy.onnx_integer`) requantizes a tensor straight onto the
next conv's grid when that conv is its only reader, and needs an 8-bit
point otherwise; :func:`add_mobilenet_points` puts the points where it
needs them:

* ``requant_branch`` (int8) on the projection output of a residual block
  (the add's first input); on the first block, when it is residual, also
  ``requant_identity`` on its shortcut (the stem's output, uint8 after
  the stem's activation);
* ``requant_out`` (int8) on a block's output when the next block is
  residual (the output then also feeds that block's add);
* ``requant_out`` (uint8) on the last ``ConvModule`` of the backbone
  (``conv2``, after its ReLU6), whose output goes to the pooling;
* every ``ConvModule`` whose conv is quantized emulates the ``int32``
  bias in eval mode (:class:`~.bias_emulation.IntBiasEmulation`).
"""
from mmcv.cnn import ConvModule
from mmpretrain.models.backbones.mobilenet_v2 import InvertedResidual
from torch import nn

from gmpq_mm.quantization.layers import is_quantized_layer
from gmpq_mm.quantization.requant_point import RequantPoint
from .bias_emulation import IntBiasEmulation

__all__ = [
    'RequantConvModule', 'RequantInvertedResidual', 'add_mobilenet_points',
    'is_mobilenet', 'refuse_checkpointing'
]


class RequantConvModule(IntBiasEmulation, ConvModule):
    """mmcv's ``ConvModule`` (order conv, norm, act) with the eval-mode
    ``int32`` bias and an optional output point ``requant_out`` (None:
    none)."""

    def _conv_norms(self):
        return [(self.conv, self.norm)] if self.with_norm else []

    def forward(self, x, activate: bool = True, norm: bool = True):
        if self.with_explicit_padding:
            x = self.padding_layer(x)
        if norm and self.with_norm:
            x = self._conv_norm(self.conv, self.norm, x)
        else:
            x = self.conv(x)
        if activate and self.with_activation:
            x = self.activate(x)
        return x if self.requant_out is None else self.requant_out(x)


class RequantInvertedResidual(InvertedResidual):
    """mmpretrain's ``InvertedResidual`` with its points
    (``requant_branch``, ``requant_out``, ``requant_identity``; None where
    there is none)."""

    def forward(self, x):
        out = self.conv(x)
        if self.use_res_connect:
            identity = x if self.requant_identity is None else \
                self.requant_identity(x)
            out = identity + self.requant_branch(out)
        return out if self.requant_out is None else self.requant_out(out)


def refuse_checkpointing(block: nn.Module, name: str, where: str) -> None:
    """A ``ValueError`` for a block with ``with_cp=True``: activation
    checkpointing runs its forward twice per step, which would move its
    points' ranges twice."""
    if getattr(block, 'with_cp', False):
        raise ValueError(
            f'{where}: block {name!r} uses with_cp=True (activation '
            'checkpointing runs its forward twice, which would move the '
            'points\' ranges twice per step); set with_cp=False or '
            'requant_points=False')


def _after_activation(backbone: nn.Module) -> bool:
    """Whether the stem (``conv1``) ends with an activation (ReLU-like:
    its output is never negative)."""
    stem = getattr(backbone, 'conv1', None)
    return isinstance(stem, ConvModule) and stem.with_activation


def is_mobilenet(backbone: nn.Module) -> bool:
    """Whether ``backbone`` has mmpretrain ``InvertedResidual`` blocks."""
    return any(isinstance(m, InvertedResidual) for m in backbone.modules())


def add_mobilenet_points(backbone: nn.Module,
                         momentum: float = 0.01,
                         where: str = 'backbone') -> int:
    """Give ``backbone`` (an mmpretrain ``MobileNetV2``) its points (in
    place); returns their number.

    Raises:
        ValueError: naming ``where`` for ``with_cp=True``, a block or
            ``ConvModule`` of a subclass (its forward may differ), or a
            ``ConvModule`` whose order is not conv, norm, act.
    """
    blocks = [(n, m) for n, m in backbone.named_modules()
              if isinstance(m, InvertedResidual)]
    modules = [(n, m) for n, m in backbone.named_modules()
               if isinstance(m, ConvModule) and is_quantized_layer(m.conv)]
    for name, m in blocks + modules:
        if type(m) not in (InvertedResidual, ConvModule):
            raise ValueError(
                f'{where}: {name!r} is a {type(m).__name__}, not mmpretrain'
                '\'s InvertedResidual / mmcv\'s ConvModule: its forward may '
                'differ, so requantization points cannot be placed in it')
        refuse_checkpointing(m, name, where)
        if isinstance(m, ConvModule) and \
                tuple(m.order) != ('conv', 'norm', 'act'):
            raise ValueError(f'{where}: ConvModule {name!r} has the order '
                             f'{m.order}, not (conv, norm, act)')
    count = 0
    for _, m in modules:
        m.__class__ = RequantConvModule
        m.requant_out = None
    for i, (_, block) in enumerate(blocks):
        block.__class__ = RequantInvertedResidual
        block.requant_branch = block.requant_out = None
        block.requant_identity = None
        if block.use_res_connect:
            block.requant_branch = RequantPoint(True, momentum)
            count += 1
            if i == 0:  # its shortcut reads the stem: a point on it alone
                block.requant_identity = RequantPoint(
                    not _after_activation(backbone), momentum)
                count += 1
        if i + 1 < len(blocks) and blocks[i + 1][1].use_res_connect:
            block.requant_out = RequantPoint(True, momentum)
            count += 1
    # the backbone's last layer feeds the pooling (a float op)
    last = getattr(backbone, backbone.layers[-1], None) \
        if hasattr(backbone, 'layers') else None
    if isinstance(last, RequantConvModule):
        last.requant_out = RequantPoint(not last.with_activation, momentum)
        count += 1
    elif isinstance(last, nn.Sequential) and \
            isinstance(last[-1], RequantInvertedResidual) and \
            last[-1].requant_out is None:
        last[-1].requant_out = RequantPoint(True, momentum)
        count += 1
    return count
