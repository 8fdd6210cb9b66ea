# Copyright (c) gmpq_mm contributors. All rights reserved.
from typing import Union

import torch
import torch.nn as nn
from mmpretrain.registry import MODELS
from torch import Tensor


@MODELS.register_module()
class ComplexityLoss(nn.Module):
    """Expected BitOPs of the supernet as a loss (docs/method.md).

    The caller passes the expected cost
    ``C = sum_l MACs_l * E[b_w,l] * E[b_a,l]`` (differentiable in the
    architecture parameters) and a reference number of MACs. The released
    code divides ``C`` by the MACs of the *first searched conv*; passing that
    same reference keeps the paper's ``cd`` values (3e-4 for CIFAR ResNet-18,
    1e-5 for ResNet-50, 0.00335 for Flowers) meaning the same thing here.

    Args:
        loss_weight (float): ``cd`` of the released code. Defaults to 3e-4.
    """

    def __init__(self, loss_weight: float = 3e-4) -> None:
        super().__init__()
        self.loss_weight = float(loss_weight)

    def forward(self, expected_bitops: Union[float, Tensor],
                reference_macs: Union[float, Tensor]) -> Tensor:
        """Compute ``loss_weight * expected_bitops / reference_macs``.

        Args:
            expected_bitops (Tensor | float): Expected cost ``C``, a scalar.
            reference_macs (float | Tensor): MACs of the first searched conv;
                a constant (detached here). Must be positive.

        Returns:
            Tensor: The weighted, normalised cost, a scalar.
        """
        expected_bitops = torch.as_tensor(expected_bitops)
        if not expected_bitops.is_floating_point():
            expected_bitops = expected_bitops.float()
        reference = torch.as_tensor(
            reference_macs,
            dtype=expected_bitops.dtype,
            device=expected_bitops.device).detach()
        if reference.numel() != 1 or not bool(reference > 0):
            raise ValueError('reference_macs must be a positive scalar, got '
                             f'{reference_macs}')
        return self.loss_weight * expected_bitops / reference.reshape(())

    def extra_repr(self) -> str:
        return f'loss_weight={self.loss_weight}'
