# Copyright (c) gmpq_mm contributors. All rights reserved.
from .attribution import (attribution_map, class_activation_map,
                          classifier_attribution_maps,
                          gradient_attribution_map, match_map_size,
                          stage_attribution_maps)

__all__ = [
    'attribution_map', 'class_activation_map', 'classifier_attribution_maps',
    'gradient_attribution_map', 'match_map_size', 'stage_attribution_maps'
]
