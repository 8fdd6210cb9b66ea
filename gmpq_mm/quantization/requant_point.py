"""Eight-bit requantization points: the integer runtime's extra roundings,
put into the PyTorch model.

An integer runtime (onnxruntime's ``QLinearConv`` / ``QLinearAdd``) cannot
keep every tensor in float the way a fake-quantized training network does:
a conv output that feeds a residual ``Add``, the shortcut, and the block
output that feeds the next block's convs and its shortcut all become 8-bit
integers. A network trained without those roundings is not the network
that runs: at 2-3-bit activations a rounding one 8-bit step away from a
coarse grid boundary moves the value a whole coarse step, and the top-1 of
a few percent of the images changes.

A :class:`RequantPoint` is that rounding in the model: a per-tensor 8-bit
fake quantizer (``uint8`` after a ReLU, symmetric ``int8`` otherwise) whose
range tracks the tensor's largest magnitude during training (an
exponential moving average of the batch maxima, as PyTorch's QAT observers
do) and is fixed in eval mode. Its range is a buffer, saved with the
checkpoint, and the ONNX export writes the point as the ``QuantizeLinear ->
DequantizeLinear`` pair the integer graph needs, with that range: the file
and the PyTorch model then round in the same places with the same scales.

A point whose range is still 0 (never trained) does nothing in eval mode
and is left out of the export, which then calibrates its own 8-bit points.

Pure PyTorch: nothing from mmengine / mmpretrain.
"""
import torch
from torch import Tensor, nn

__all__ = [
    'RequantPoint', 'is_requant_point', 'fake_quantize_8bit', 'POINT_STATE'
]

# The state a point adds to a network (an FP checkpoint lacks it).
POINT_STATE = 'point_range'


class RequantPoint(nn.Module):
    """An 8-bit fake-quantization point with a tracked range.

    Args:
        signed (bool): Symmetric ``int8`` (codes ``[-128, 127]``, scale
            ``range / 127``) for a tensor that can be negative; otherwise
            ``uint8`` (``[0, 255]``, scale ``range / 255``; negative values
            clip to 0, so only use it after a ReLU).
        momentum (float): Weight of each training batch's maximum in the
            moving average of the range (the first batch sets it).
    """

    def __init__(self, signed: bool, momentum: float = 0.01):
        super().__init__()
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f'RequantPoint momentum must be in (0, 1], got '
                             f'{momentum!r}')
        self.signed = bool(signed)
        self.momentum = float(momentum)
        self.register_buffer(POINT_STATE, torch.zeros(()))

    @property
    def qrange(self):
        """``(quant_min, quant_max)`` of the 8-bit container."""
        return (-128, 127) if self.signed else (0, 255)

    @property
    def levels(self) -> int:
        """Codes from 0 to the range: 127 (signed) or 255."""
        return 127 if self.signed else 255

    @property
    def calibrated(self) -> bool:
        return bool(self.point_range > 0)

    def _scale(self) -> Tensor:
        """The 8-bit step ``range / levels`` (float32, one element; a tiny
        positive step while the range is still 0)."""
        return (self.point_range.float().clamp_min(1e-12) /
                self.levels).reshape(1)

    def scale(self) -> float:
        """The 8-bit step of a calibrated point, as exported."""
        return float(self._scale())

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        x = x.detach()
        seen = x.abs().amax() if self.signed else x.amax().clamp_min(0)
        seen = seen.float().to(self.point_range.device)
        r = self.point_range
        # No host sync: the first batch (range 0) sets the range.
        self.point_range.copy_(
            torch.where(r > 0, r + self.momentum * (seen - r), seen))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self._observe(x)
        elif not self.calibrated:
            return x
        return fake_quantize_8bit(x.float(),
                                  self._scale().to(x.device),
                                  *self.qrange).to(x.dtype)

    def extra_repr(self) -> str:
        return (f'{"int8" if self.signed else "uint8"}, '
                f'momentum={self.momentum:g}')


class _FakeQuantize(torch.autograd.Function):
    """``torch.fake_quantize_per_tensor_affine`` (zero point 0) in plain
    ops: the same values and gradient (tested equal), about twice as fast
    on CPU, where the fused op is not vectorised (measured in
    ``docs/user_guides/export.md``)."""

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax):
        q = torch.mul(x, 1.0 / scale).round_()  # as the op: x * (1 / s)
        inside = (q >= qmin) & (q <= qmax)
        ctx.save_for_backward(inside)
        return q.clamp_(qmin, qmax).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        inside, = ctx.saved_tensors
        return grad * inside, None, None, None


def fake_quantize_8bit(x: Tensor, scale: Tensor, qmin: int,
                       qmax: int) -> Tensor:
    """``round(x / scale)`` clamped to ``[qmin, qmax]``, times ``scale``
    (float32 ``x``, one-element ``scale``), with a straight-through
    gradient inside the range: PyTorch's fused op on CUDA, plain ops on
    CPU."""
    if x.is_cuda:
        zero = torch.zeros(1, dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, qmin,
                                                     qmax)
    return _FakeQuantize.apply(x, scale, qmin, qmax)


def is_requant_point(module: nn.Module) -> bool:
    """Whether ``module`` is a :class:`RequantPoint`."""
    return isinstance(module, RequantPoint)
