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

The block keeps its class's parameters and names (an FP checkpoint loads as
before; only the points' ranges are new); its class becomes the subclass
below, whose ``forward`` is mmpretrain's with the points in it.
"""
import torch
import torch.utils.checkpoint as cp
from mmpretrain.models.backbones.resnet import BasicBlock, Bottleneck
from torch import nn

from gmpq_mm.quantization.integer_fold import folded_bias_shift
from gmpq_mm.quantization.requant_point import RequantPoint

__all__ = ['RequantBasicBlock', 'RequantBottleneck', 'add_requant_points']


class _RequantMixin:

    def _add_points(self, first: bool, momentum: float) -> None:
        self.requant_in = RequantPoint(False, momentum) if first else None
        self.requant_branch = RequantPoint(True, momentum)
        self.requant_shortcut = (
            RequantPoint(True, momentum)
            if self.downsample is not None else None)
        self.requant_out = RequantPoint(False, momentum)

    # eval: each integer conv's bias rounded as the runtime holds it
    emulate_int_bias = True

    def _conv_norm(self, conv, norm, x):
        out = norm(conv(x))
        if self.training or not self.emulate_int_bias:
            return out
        return out + self._shift(conv, norm).reshape(1, -1, 1, 1).to(out)

    def train(self, mode: bool = True):
        self.__dict__.pop('_shift_cache', None)  # model.eval() recomputes
        return super().train(mode)

    def _shift(self, conv, norm):
        """:func:`folded_bias_shift`, cached from one ``eval()`` call to
        the next; recomputed sooner when a tensor it reads was changed in
        place (an optimizer step, a load) or moved."""
        tensors = [
            t for t in (conv.weight, getattr(conv, 'act_range', None),
                        getattr(conv, 'w_threshold', None), norm.weight,
                        norm.bias, norm.running_mean, norm.running_var)
            if t is not None
        ]
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        cache = self.__dict__.setdefault('_shift_cache', {})
        hit = cache.get(id(conv))
        if hit is None or hit[0] != key:
            hit = (key, folded_bias_shift(conv, norm))
            cache[id(conv)] = hit
        return hit[1]

    def _conv_norms(self):
        """The ``(conv, norm)`` pairs of the block, the downsample's too."""
        pairs = [(self.conv1, self.norm1), (self.conv2, self.norm2)]
        if hasattr(self, 'conv3'):
            pairs.append((self.conv3, self.norm3))
        ds = self.downsample
        if isinstance(ds, nn.Sequential) and len(ds) >= 2:
            pairs.append((ds[-2], ds[-1]))
        return pairs

    def bake_folded_bias(self) -> None:
        """Move the eval-mode bias rounding into the norms' biases and stop
        emulating it: the same eval function, in plain conv / BatchNorm
        (the ONNX export calls it on its eval copy). Nothing to do when
        the block does not emulate it.

        Raises:
            RuntimeError: in training mode (the eval function is baked).
        """
        if not self.emulate_int_bias:
            return
        if self.training:
            raise RuntimeError('bake_folded_bias: call it in eval mode')
        for conv, norm in self._conv_norms():
            shift = folded_bias_shift(conv, norm)
            if norm.bias is None:  # affine=False: the shift is the bias
                norm.bias = nn.Parameter(shift.to(norm.running_mean))
            else:
                with torch.no_grad():
                    norm.bias += shift.to(norm.bias)
        self.emulate_int_bias = False
        self.__dict__.pop('_shift_cache', None)

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
        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(inner, x)
        else:
            out = inner(x)
        return self.requant_out(self.relu(out))


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


_SWAP = ((BasicBlock, RequantBasicBlock), (Bottleneck, RequantBottleneck))


def _requant_class(block: nn.Module):
    """The subclass for ``block``: mmpretrain's own ``BasicBlock`` /
    ``Bottleneck`` only (a subclass may change ``forward``, which would put
    the points in the wrong places); None for anything else."""
    return dict(_SWAP).get(type(block))


def add_requant_points(backbone: nn.Module,
                       momentum: float = 0.01,
                       where: str = 'backbone') -> int:
    """Give every ResNet block of ``backbone`` its requantization points
    (in place); returns the number of points.

    Raises:
        ValueError: naming ``where`` and the backbone's type when it has no
            ResNet ``BasicBlock`` / ``Bottleneck``, or a block whose class
            has its own ``forward``.
    """
    blocks = [(n, m) for n, m in backbone.named_modules()
              if isinstance(m, (BasicBlock, Bottleneck))]
    if any(isinstance(m, _RequantMixin) for _, m in blocks):
        raise ValueError(f'{where}: already has requantization points')
    if not blocks:
        raise ValueError(
            f'{where}: requant_points=True needs a ResNet-family backbone '
            f'(mmpretrain BasicBlock / Bottleneck blocks); '
            f'{type(backbone).__name__} has none. Set requant_points=False '
            '(the ONNX export then calibrates its own 8-bit points)')
    count = 0
    for i, (name, block) in enumerate(blocks):
        cls = _requant_class(block)
        if cls is None:
            raise ValueError(
                f'{where}: block {name!r} is a {type(block).__name__}, not '
                'mmpretrain\'s BasicBlock / Bottleneck: its forward may '
                'differ, so requantization points cannot be placed in it')
        block.__class__ = cls
        block._add_points(first=i == 0, momentum=momentum)
        count += sum(1 for m in block.children()
                     if isinstance(m, RequantPoint))
    return count
