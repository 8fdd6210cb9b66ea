"""Keep quiet about state that calibration is about to fill.

A quantized layer has entries an FP checkpoint lacks (``act_range``,
``w_threshold``; a requantization point its ``point_range``). Loading the
FP ImageNet weights at the start of a finetune therefore made mmengine
log "The model and loaded state dict do not match exactly ... missing
keys ..." with every such entry -- expected,
since :class:`~gmpq_mm.engine.CalibrationHook` sets them next, but it reads
as an error. While :class:`ExpectedMissingKeys` is attached, loads do not
report those entries of quantized layers as missing (any other missing or
unexpected key still is); it counts what it left out.
"""
from typing import List, Sequence

from torch import nn

from gmpq_mm.quantization.layers import is_quantized_layer
from gmpq_mm.quantization.requant_point import is_requant_point

__all__ = ['ExpectedMissingKeys']


class ExpectedMissingKeys:
    """Load-state-dict post hooks on a model's quantized layers.

    Args:
        names (Sequence[str]): Last components of the keys to leave out
            (``('act_range', 'w_threshold')``).
    """

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self.left_out: List[str] = []
        self._handles = []

    def _hook(self, module, incompatible_keys) -> None:
        missing = incompatible_keys.missing_keys
        keep = [k for k in missing if k.rsplit('.', 1)[-1] not in self.names]
        self.left_out += [k for k in missing if k not in keep]
        missing[:] = keep

    def attach(self, model: nn.Module) -> 'ExpectedMissingKeys':
        """Start leaving the keys out of ``model``'s loads."""
        for module in model.modules():
            if is_quantized_layer(module) or is_requant_point(module):
                self._handles.append(
                    module.register_load_state_dict_post_hook(self._hook))
        return self

    def detach(self) -> List[str]:
        """Stop; returns the keys left out (each once, in load order)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return list(dict.fromkeys(self.left_out))
