# Copyright (c) gmpq_mm contributors. All rights reserved.
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmpretrain.registry import MODELS
from torch import Tensor

Scalar = Union[float, Tensor]


@MODELS.register_module()
class AttributionRankLoss(nn.Module):
    """Attribution loss of GMPQ between a student and a teacher map.

    Three modes (docs/method.md, Attribution and its loss):

    - ``'pnorm'`` (what the released code runs):
      ``L = mean_{n,h,w} (norm(A_t ** p) - norm(A_s)) ** 2`` with ``norm``
      the per-sample L2 normalisation of the flattened map. Raising the
      teacher map to ``p > 1`` sharpens it, so the student is pushed towards
      the teacher's highest-ranked pixels. If ``product`` is set, ``p`` is
      capacity-aware: ``p = product * capacity`` where the caller passes
      ``capacity = mean_l 1 / (E[b_w,l] * E[b_a,l])`` (the paper's idea; a
      low-bit student only has to match the top of the ranking).
    - ``'rank'`` (not in the released code): an explicit, differentiable
      ranking. Each map is divided by its per-sample maximum (so the loss is
      invariant to multiplying either by a positive constant); the soft
      rank of pixel ``i`` is ``sum_{j != i} sigmoid((a_i - a_j) / tau)``,
      divided by ``M - 1`` to lie in ``[0, 1]`` (``M`` pixels). Student and
      teacher are ranked by the same formula and the loss is the MSE between
      the two, so it is 0 at perfect agreement (a small ``tau`` makes the
      ranks nearly hard). ``p`` plays no part here since a
      power does not change ranks. Costs ``O(N * M**2)`` memory, cheap for
      the 4x4 / 7x7 maps of the last stage.
    - ``'hierarchical'`` (IJCV 2024 journal version, attribution
      partitioning against rank noise): both maps are average-pooled to
      ``g x g`` for each ``g`` in ``groups``; the ``'pnorm'`` loss is averaged
      over those levels and the full map. Pooling to a size not smaller than
      the map would repeat the full level, so such levels are skipped.

    Args:
        mode (str): One of ``'pnorm'``, ``'rank'``, ``'hierarchical'``.
            Defaults to ``'pnorm'``.
        pnorm (float): Power of the teacher map when ``product`` is None.
            Defaults to 3.0 (released code).
        product (float, optional): If set, ``p = product * capacity``
            (paper: 24). Defaults to None (off, as in the released code).
        groups (Sequence[int]): Pooled sizes of the ``'hierarchical'`` mode.
            Each must be at least 2: a 1x1 level is constant after the
            per-sample normalisation and would only dilute the loss.
            Defaults to ``(2, 4)``.
        tau (float): Temperature of the soft ranks (in units of the
            max-normalised map). Defaults to 0.1.
        loss_weight (float): Multiplier of the loss (``aw`` of the released
            code). Defaults to 40.0 (README value).
        eps (float): Guards the normalisations of all-zero maps.
            Defaults to 1e-12.
    """

    MODES = ('pnorm', 'rank', 'hierarchical')

    def __init__(self,
                 mode: str = 'pnorm',
                 pnorm: float = 3.0,
                 product: Optional[float] = None,
                 groups: Sequence[int] = (2, 4),
                 tau: float = 0.1,
                 loss_weight: float = 40.0,
                 eps: float = 1e-12) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f'mode must be one of {self.MODES}, '
                             f'got {mode!r}')
        if pnorm <= 0:
            raise ValueError(f'pnorm must be positive, got {pnorm}')
        if product is not None and product <= 0:
            raise ValueError(f'product must be positive, got {product}')
        if tau <= 0:
            raise ValueError(f'tau must be positive, got {tau}')
        groups = tuple(int(g) for g in groups)
        if any(g < 2 for g in groups):
            raise ValueError(
                f'every group size must be >= 2, got {groups}: a 1x1 level '
                'is constant after per-sample normalisation')
        self.mode = mode
        self.pnorm = float(pnorm)
        self.product = None if product is None else float(product)
        self.groups = groups
        self.tau = float(tau)
        self.loss_weight = float(loss_weight)
        self.eps = float(eps)

    def _power(self, capacity: Optional[Scalar]) -> Scalar:
        """The exponent ``p`` of the teacher map."""
        if self.product is None:
            # capacity is accepted but unused so callers can always pass it.
            return self.pnorm
        if capacity is None:
            raise ValueError('capacity is required when product is set '
                             '(capacity-aware p = product * capacity)')
        capacity = torch.as_tensor(capacity).detach()
        if capacity.numel() != 1:
            raise ValueError('capacity must be a scalar, got shape '
                             f'{tuple(capacity.shape)}')
        return self.product * capacity.reshape(()).float()

    def _pnorm_loss(self, student: Tensor, teacher: Tensor,
                    p: Scalar) -> Tensor:
        """Normalised L2 between ``teacher ** p`` and ``student``."""
        student = student.flatten(1)
        # Maps are post-ReLU; the clamp keeps fractional powers real.
        teacher = teacher.flatten(1).clamp_min(0)
        if isinstance(p, Tensor):
            p = p.to(device=teacher.device, dtype=teacher.dtype)
        teacher = teacher.pow(p)
        diff = F.normalize(teacher, dim=1, eps=self.eps) - \
            F.normalize(student, dim=1, eps=self.eps)
        return diff.pow(2).mean()

    def _soft_ranks(self, amap: Tensor) -> Tensor:
        """Soft ranks in ``[0, 1]`` of each flattened ``(N, M)`` map."""
        denom = max(amap.size(1) - 1, 1)
        # Dividing by the (detached) max gives scale invariance and makes
        # tau a fraction of the map's range.
        scale = amap.detach().abs().amax(dim=1, keepdim=True)
        amap = amap / scale.clamp_min(self.eps)
        diff = amap[:, :, None] - amap[:, None, :]
        # The diagonal adds sigmoid(0) = 1/2 to every pixel: remove it.
        return (torch.sigmoid(diff / self.tau).sum(-1) - 0.5) / denom

    def _rank_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        """MSE between the student's and the teacher's soft ranks.

        Both go through the same soft ranking, so the loss is exactly 0
        (its minimum) when the student's map is a positive multiple of the
        teacher's; hard teacher ranks would instead reward a student whose
        pixel gaps are much wider than ``tau``, not one that agrees.
        """
        return (self._soft_ranks(student.flatten(1)) -
                self._soft_ranks(teacher.flatten(1))).pow(2).mean()

    def _hierarchical_loss(self, student: Tensor, teacher: Tensor,
                           p: Scalar) -> Tensor:
        """``'pnorm'`` loss averaged over the full map and pooled levels."""
        if student.dim() == 3:
            student, teacher = student[:, None], teacher[:, None]
        if student.dim() != 4:
            raise ValueError('hierarchical mode needs (N, H, W) or '
                             f'(N, C, H, W) maps, got {student.dim()}D')
        height, width = student.shape[-2:]
        losses = [self._pnorm_loss(student, teacher, p)]
        for g in self.groups:
            size = (min(g, height), min(g, width))
            if size == (height, width):
                continue
            losses.append(
                self._pnorm_loss(
                    F.adaptive_avg_pool2d(student, size),
                    F.adaptive_avg_pool2d(teacher, size), p))
        return torch.stack(losses).mean()

    def forward(self,
                student_map: Tensor,
                teacher_map: Tensor,
                capacity: Optional[Scalar] = None) -> Tensor:
        """Compute the weighted attribution loss.

        Args:
            student_map (Tensor): Map of the quantized network, shape
                ``(N, H, W)`` (or ``(N, 1, H, W)``).
            teacher_map (Tensor): Map of the FP teacher, same shape; it is
                detached here.
            capacity (float | Tensor, optional): ``mean_l 1 / (E[b_w,l] *
                E[b_a,l])`` of the supernet; used (detached) only when
                ``product`` is set. Defaults to None.

        Returns:
            Tensor: ``loss_weight * loss``, a scalar.
        """
        if student_map.shape != teacher_map.shape:
            raise ValueError('student and teacher maps differ in shape: '
                             f'{tuple(student_map.shape)} vs '
                             f'{tuple(teacher_map.shape)}')
        teacher_map = teacher_map.detach()
        if self.mode == 'rank':
            loss = self._rank_loss(student_map, teacher_map)
        elif self.mode == 'hierarchical':
            loss = self._hierarchical_loss(student_map, teacher_map,
                                           self._power(capacity))
        else:
            loss = self._pnorm_loss(student_map, teacher_map,
                                    self._power(capacity))
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return (f'mode={self.mode!r}, pnorm={self.pnorm}, '
                f'product={self.product}, groups={self.groups}, '
                f'tau={self.tau}, loss_weight={self.loss_weight}')
