from .mixed_precision_backbone import MixedPrecisionBackbone
from .quantized_backbone import QuantizedBackbone

__all__ = ['MixedPrecisionBackbone', 'QuantizedBackbone']
