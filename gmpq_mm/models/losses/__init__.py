# Copyright (c) gmpq_mm contributors. All rights reserved.
from .attribution_rank_loss import AttributionRankLoss
from .complexity_loss import ComplexityLoss

__all__ = ['AttributionRankLoss', 'ComplexityLoss']
