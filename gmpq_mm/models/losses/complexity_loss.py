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
    on the network's size. With a model-size budget ``S_B`` (the search
    model's ``target_size_mb``) the expected size ``S`` adds its own term
    ``loss_weight * relu(S / S_B - 1) ** 2``; with both budgets both terms
    count, each hinge being scale-free.

    Args:
        loss_weight (float): ``cd`` of the released code. Defaults to 3e-4.
        mode (str): ``'reference'`` (the released code: ``C`` over the first
            conv's MACs) or ``'budget'`` (needs the model's
            ``target_bitops`` or ``target_size_mb``). Defaults to
            ``'reference'``.
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
                budget: Optional[float] = None,
                size: Union[float, Tensor, None] = None,
                size_budget: Optional[float] = None) -> Tensor:
        """The weighted cost: ``loss_weight * C / reference_macs``, or in
        ``'budget'`` mode ``loss_weight * relu(C / budget - 1) ** 2`` (plus
        ``loss_weight * relu(size / size_budget - 1) ** 2`` with a size
        budget; the size is ignored in ``'reference'`` mode).

        Args:
            expected_bitops (Tensor | float): Expected cost ``C``, a scalar.
            reference_macs (float | Tensor): MACs of the first searched conv;
                a constant (detached here). Must be positive.
            budget (float, optional): BitOPs budget; in ``'budget'`` mode
                it or ``size_budget`` is required (and positive).
            size (Tensor | float, optional): Expected model size (MB).
            size_budget (float, optional): Model-size budget (MB).

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
            terms = [(expected_bitops, budget)]
            if size_budget is not None or size is not None:
                terms.append((size, size_budget))
            if all(b is None for _, b in terms) or any(
                    b is not None and not float(b) > 0 for _, b in terms) or \
                    (size_budget is not None and size is None):
                raise ValueError("ComplexityLoss(mode='budget') needs a "
                                 f'positive budget, got {budget!r} (size '
                                 f'{size_budget!r}; set the search model\'s '
                                 'target_bitops or target_size_mb)')
            loss = expected_bitops.new_zeros(())
            for value, limit in terms:
                if limit is not None:
                    excess = torch.relu(
                        torch.as_tensor(value).to(expected_bitops) /
                        float(limit) - 1)
                    loss = loss + excess * excess
            return self.loss_weight * loss
        return self.loss_weight * expected_bitops / reference.reshape(())

    def extra_repr(self) -> str:
        return f'loss_weight={self.loss_weight}, mode={self.mode!r}'
