"""The integer runtime's rounded bias, emulated by a module in eval mode.

A module with this mixin lists its ``(conv, norm)`` pairs
(``_conv_norms``) and runs each pair through :meth:`_conv_norm`: in eval
mode the norm's output gets
:func:`~gmpq_mm.quantization.integer_fold.folded_bias_shift`, the bias
rounded to the ``int32`` unit the runtime's folded conv holds. The shift is
computed once per ``eval()`` (sooner when a tensor it reads changed in
place); :meth:`bake_folded_bias` moves it into the norms' biases, which is
how the ONNX export sees it.
"""
import torch
from torch import nn

from gmpq_mm.quantization.integer_fold import folded_bias_shift

__all__ = ['IntBiasEmulation']


class IntBiasEmulation:
    """Mixin for an ``nn.Module`` subclass with ``_conv_norms()``."""

    # eval: each integer conv's bias rounded as the runtime holds it
    emulate_int_bias = True

    def _conv_norms(self):  # pragma: no cover - each subclass has its own
        raise NotImplementedError

    def train(self, mode: bool = True):
        self.__dict__.pop('_shift_cache', None)  # model.eval() recomputes
        return super().train(mode)

    def _conv_norm(self, conv, norm, x):
        out = norm(conv(x))
        if self.training or not self.emulate_int_bias:
            return out
        return out + self._shift(conv, norm).reshape(1, -1, 1, 1).to(out)

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

    def bake_folded_bias(self) -> None:
        """Move the eval-mode bias rounding into the norms' biases and stop
        emulating it: the same eval function, in plain conv / BatchNorm
        (the ONNX export calls it on its eval copy). Nothing to do when
        the module does not emulate it.

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
