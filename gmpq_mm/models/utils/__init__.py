# Copyright (c) gmpq_mm contributors. All rights reserved.
from .attribution import (attribution_map, class_activation_map,
                          gradient_attribution_map)

__all__ = [
    'attribution_map', 'class_activation_map', 'gradient_attribution_map'
]
