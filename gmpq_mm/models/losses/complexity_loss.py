# Copyright (c) gmpq_mm contributors. All rights reserved.
from typing import Optional, Union

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

    With ``mode='budget'`` the loss is measured against the search's BitOPs
    budget ``B`` instead: ``loss_weight * relu(C / B - 1) ** 2``. It pulls the
    expected cost down to the budget and no further, so searches at two
    budgets train differently (with the released linear cost the budget
    only changes the exported policy), and ``loss_weight`` no longer depends
    on the network's size.

    Args:
        loss_weight (float): ``cd`` of the released code. Defaults to 3e-4.
        mode (str): ``'reference'`` (the released code: ``C`` over the first
            conv's MACs) or ``'budget'`` (needs the model's
            ``target_bitops``). Defaults to ``'reference'``.
    """

    MODES = ('reference', 'budget')

    def __init__(self,
                 loss_weight: float = 3e-4,
                 mode: str = 'reference') -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f'ComplexityLoss: mode must be one of '
                             f'{self.MODES}, got {mode!r}')
        self.loss_weight = float(loss_weight)
        self.mode = mode

    def forward(self,
                expected_bitops: Union[float, Tensor],
                reference_macs: Union[float, Tensor],
                budget: Optional[float] = None) -> Tensor:
        """The weighted cost: ``loss_weight * C / reference_macs``, or in
        ``'budget'`` mode ``loss_weight * relu(C / budget - 1) ** 2``.

        Args:
            expected_bitops (Tensor | float): Expected cost ``C``, a scalar.
            reference_macs (float | Tensor): MACs of the first searched conv;
                a constant (detached here). Must be positive.
            budget (float, optional): BitOPs budget; required and positive
                in ``'budget'`` mode.

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
        if self.mode == 'budget':
            if budget is None or not float(budget) > 0:
                raise ValueError("ComplexityLoss(mode='budget') needs a "
                                 f'positive budget, got {budget!r} (set the '
                                 "search model's target_bitops)")
            excess = torch.relu(expected_bitops / float(budget) - 1)
            return self.loss_weight * excess * excess
        return self.loss_weight * expected_bitops / reference.reshape(())

    def extra_repr(self) -> str:
        return f'loss_weight={self.loss_weight}, mode={self.mode!r}'
