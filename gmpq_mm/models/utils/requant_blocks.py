"""ResNet blocks with the 8-bit requantization points of an integer runtime.

:func:`add_requant_points` gives every ``BasicBlock`` / ``Bottleneck`` of an
mmpretrain ResNet (``ResNet``, ``ResNetV1c/d``, ``ResNet_CIFAR``)
the :class:`~gmpq_mm.quantization.requant_point.RequantPoint` s that
onnxruntime's integer graph has (see ``docs/user_guides/export.md``):

* ``requant_branch`` (int8): the residual branch's last norm output, the
  first input of the residual add;
* ``requant_shortcut`` (int8): the downsample's output, when there is one;
* ``requant_out`` (uint8): the block's output after its ReLU, which the next
  block's convs and its shortcut read;
* ``requant_in`` (uint8), first block only: the stem's output;
* in eval mode, each integer conv's BatchNorm output gets the shift of
  :func:`~gmpq_mm.quantization.integer_fold.folded_bias_shift`: the bias
  rounded to int32 as the runtime's folded conv holds it.

(A MobileNetV2 gets its points from
:func:`~.requant_mobilenet.add_mobilenet_points`, which
:func:`add_requant_points` tries first.)

The block keeps its class's parameters and names (an FP checkpoint loads as
before; only the points' ranges are new); its class becomes the subclass
below, whose ``forward`` is mmpretrain's with the points in it.
"""
from mmpretrain.models.backbones.resnet import BasicBlock, Bottleneck
from torch import nn

from gmpq_mm.quantization.requant_point import RequantPoint
from .bias_emulation import IntBiasEmulation
from .requant_mobilenet import (add_mobilenet_points, is_mobilenet,
                                refuse_checkpointing)

__all__ = ['RequantBasicBlock', 'RequantBottleneck', 'add_requant_points']


class _RequantMixin(IntBiasEmulation):

    def _add_points(self, first: bool, momentum: float) -> None:
        self.requant_in = RequantPoint(False, momentum) if first else None
        self.requant_branch = RequantPoint(True, momentum)
        self.requant_shortcut = (
            RequantPoint(True, momentum)
            if self.downsample is not None else None)
        self.requant_out = RequantPoint(False, momentum)

    def _conv_norms(self):
        """The ``(conv, norm)`` pairs of the block, the downsample's too."""
        pairs = [(self.conv1, self.norm1), (self.conv2, self.norm2)]
        if hasattr(self, 'conv3'):
            pairs.append((self.conv3, self.norm3))
        ds = self.downsample
        if isinstance(ds, nn.Sequential) and len(ds) >= 2:
            pairs.append((ds[-2], ds[-1]))
        return pairs

    def _residual(self, x, out):
        identity = x
        if self.downsample is not None:
            ds = self.downsample
            if isinstance(ds, nn.Sequential) and len(ds) >= 2:
                identity = ds[:-2](x) if len(ds) > 2 else x
                identity = self._conv_norm(ds[-2], ds[-1], identity)
            else:
                identity = ds(x)
            identity = self.requant_shortcut(identity)
        return self.drop_path(self.requant_branch(out)) + identity

    def _run(self, inner, x):
        if self.requant_in is not None:
            x = self.requant_in(x)
        # with_cp is refused by add_requant_points
        return self.requant_out(self.relu(inner(x)))


class RequantBasicBlock(_RequantMixin, BasicBlock):
    """mmpretrain's ``BasicBlock`` with requantization points."""

    def forward(self, x):

        def inner(x):
            out = self.relu(self._conv_norm(self.conv1, self.norm1, x))
            return self._residual(x,
                                  self._conv_norm(self.conv2, self.norm2, out))

        return self._run(inner, x)


class RequantBottleneck(_RequantMixin, Bottleneck):
    """mmpretrain's ``Bottleneck`` with requantization points."""

    def forward(self, x):

        def inner(x):
            out = self.relu(self._conv_norm(self.conv1, self.norm1, x))
            out = self.relu(self._conv_norm(self.conv2, self.norm2, out))
            return self._residual(x,
                                  self._conv_norm(self.conv3, self.norm3, out))

        return self._run(inner, x)


# mmpretrain's own classes only: a subclass may change ``forward``, which
# would put the points in the wrong places
_SWAP = {BasicBlock: RequantBasicBlock, Bottleneck: RequantBottleneck}


def add_requant_points(backbone: nn.Module,
                       momentum: float = 0.01,
                       where: str = 'backbone') -> int:
    """Give every ResNet block of ``backbone`` (or a MobileNetV2's blocks)
    its requantization points (in place); returns the number of points.

    Raises:
        ValueError: naming ``where`` and the backbone's type when it has no
            ResNet ``BasicBlock`` / ``Bottleneck``, or a block whose class
            has its own ``forward``.
    """
    if is_mobilenet(backbone):
        return add_mobilenet_points(backbone, momentum, where)
    blocks = [(n, m) for n, m in backbone.named_modules()
              if isinstance(m, (BasicBlock, Bottleneck))]
    if any(isinstance(m, _RequantMixin) for _, m in blocks):
        raise ValueError(f'{where}: already has requantization points')
    if not blocks:
        raise ValueError(
            f'{where}: requant_points=True needs a ResNet-family backbone '
            f'(mmpretrain BasicBlock / Bottleneck blocks) or MobileNetV2; '
            f'{type(backbone).__name__} has none. Set requant_points=False '
            '(the ONNX export then calibrates its own 8-bit points)')
    count = 0
    for i, (name, block) in enumerate(blocks):
        cls = _SWAP.get(type(block))
        if cls is None:
            raise ValueError(
                f'{where}: block {name!r} is a {type(block).__name__}, not '
                'mmpretrain\'s BasicBlock / Bottleneck: its forward may '
                'differ, so requantization points cannot be placed in it')
        refuse_checkpointing(block, name, where)
        block.__class__ = cls
        block._add_points(first=i == 0, momentum=momentum)
        count += sum(1 for m in block.children()
                     if isinstance(m, RequantPoint))
    return count
