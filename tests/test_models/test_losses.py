# Copyright (c) gmpq_mm contributors. All rights reserved.
import math

import pytest
import torch
from mmpretrain.registry import MODELS

from gmpq_mm.models.losses import AttributionRankLoss, ComplexityLoss


def _map(rows):
    """A (1, H, W) float64 map from nested lists."""
    return torch.tensor([rows], dtype=torch.float64)


def test_registered_in_mmpretrain():
    loss = MODELS.build(dict(type='AttributionRankLoss', mode='rank'))
    assert isinstance(loss, AttributionRankLoss) and loss.mode == 'rank'
    assert isinstance(
        MODELS.build(dict(type='ComplexityLoss')), ComplexityLoss)


def test_bad_arguments():
    with pytest.raises(ValueError, match='pnorm.*rank.*hierarchical'):
        AttributionRankLoss(mode='l2')
    with pytest.raises(ValueError, match='>= 2'):
        AttributionRankLoss(mode='hierarchical', groups=(1, 2))
    loss = AttributionRankLoss(product=24.)
    with pytest.raises(ValueError, match='capacity'):
        loss(_map([[1., 0.]]), _map([[1., 0.]]))
    with pytest.raises(ValueError, match='shape'):
        loss(_map([[1., 0.]]), _map([[1., 0., 0.]]), capacity=0.1)


def test_pnorm_by_hand():
    # norm(s) = (1, 0, 0, 0). For unit vectors ||a - b||^2 = 2 - 2 a.b, and
    # the mean runs over the 4 pixels.
    s = _map([[1., 0.], [0., 0.]])
    # p = 1, t = (1, 1, 0, 0): a.b = 1/sqrt(2) -> (2 - sqrt(2)) / 4
    t = _map([[1., 1.], [0., 0.]])
    loss = AttributionRankLoss(pnorm=1., loss_weight=1.)(s, t)
    assert loss.item() == pytest.approx(0.1464466094067262, rel=1e-9)
    assert loss.item() == pytest.approx((2 - math.sqrt(2)) / 4, rel=1e-12)

    t = _map([[2., 1.], [0., 0.]])
    # p = 1: a.b = 2/sqrt(5) -> (2 - 4/sqrt(5)) / 4
    loss1 = AttributionRankLoss(pnorm=1., loss_weight=1.)(s, t)
    assert loss1.item() == pytest.approx(0.05278640450004207, rel=1e-9)
    # p = 3: t^3 = (8, 1, 0, 0), a.b = 8/sqrt(65) -> (2 - 16/sqrt(65)) / 4.
    # The sharper teacher is closer to the one-hot student.
    loss3 = AttributionRankLoss(pnorm=3., loss_weight=1.)(s, t)
    assert loss3.item() == pytest.approx(0.0038610616431661304, rel=1e-9)
    # loss_weight multiplies (default 40)
    assert AttributionRankLoss(pnorm=3.)(s, t).item() == pytest.approx(
        40 * 0.0038610616431661304, rel=1e-9)


def test_capacity_aware_power():
    # product 24, every layer w4a4: capacity = 1 / (4 * 4), p = 1.5, and
    # (4, 1)^1.5 = (8, 1): the same value as p = 3 on (2, 1) above.
    s = _map([[1., 0.], [0., 0.]])
    t = _map([[4., 1.], [0., 0.]])
    loss = AttributionRankLoss(product=24., loss_weight=1.)
    capacity = torch.tensor(1 / 16, requires_grad=True)
    value = loss(s, t, capacity=capacity)
    assert value.item() == pytest.approx(0.0038610616431661304, rel=1e-9)
    assert not value.requires_grad  # capacity is detached
    from_float = loss(s, t, capacity=1 / 16)
    assert from_float.item() == pytest.approx(value.item(), rel=1e-12)
    # without product, capacity is ignored and pnorm (3) is used
    plain = AttributionRankLoss(loss_weight=1.)
    ignored = plain(s, t, capacity=1 / 16)
    assert ignored.item() == pytest.approx(plain(s, t).item(), rel=1e-12)


def test_gradients_reach_student_only():
    s = torch.rand(2, 3, 3, dtype=torch.float64, requires_grad=True)
    t = torch.rand(2, 3, 3, dtype=torch.float64, requires_grad=True)
    for mode in AttributionRankLoss.MODES:
        s.grad, t.grad = None, None
        AttributionRankLoss(mode=mode)(s, t).backward()
        assert s.grad is not None and torch.isfinite(s.grad).all()
        assert s.grad.abs().sum() > 0
        assert t.grad is None, mode


def test_rank_by_hand():
    loss = AttributionRankLoss(mode='rank', tau=0.1, loss_weight=1.)
    # student (0, 1) is already max-normalised; soft rank of pixel 1 is
    # sigmoid(10), of pixel 0 sigmoid(-10) = 1 - sigmoid(10). The teacher
    # (1, 0) gets the same soft ranks reversed: each error is
    # sigmoid(10) - sigmoid(-10) = 2 sigmoid(10) - 1, loss its square.
    s = _map([[0., 1.]])
    assert loss(s, _map([[1., 0.]])).item() == pytest.approx(
        (2 * 0.999954602131 - 1)**2, rel=1e-9)
    # A tied teacher ranks both pixels 1/2: loss = (1/2 - sigmoid(-10))^2.
    assert loss(s, _map([[3., 3.]])).item() == pytest.approx(
        0.249954604192, rel=1e-9)


def test_rank_is_minimal_at_perfect_agreement():
    torch.manual_seed(0)
    teacher = torch.rand(3, 4, 4, dtype=torch.float64)
    loss = AttributionRankLoss(mode='rank', loss_weight=1.)
    # the student equals the teacher (or a positive multiple of it): zero
    # loss and zero gradient, whatever tau
    for student in (teacher.clone(), 2.5 * teacher):
        student.requires_grad_(True)
        value = loss(student, teacher)
        value.backward()
        assert value.item() == pytest.approx(0., abs=1e-15)
        assert student.grad.abs().max().item() < 1e-12
    # any other map, in particular the same order with wider gaps (which
    # hard teacher ranks would prefer), scores worse
    spread = teacher.flatten(1).argsort(1).argsort(1).double().reshape(
        teacher.shape)  # ranks 0..15: the same order, even gaps
    noisy = teacher + 0.3 * torch.rand_like(teacher)
    for other in (spread, teacher**4, noisy, teacher.flip(-1)):
        assert loss(other, teacher).item() > 1e-6


def test_rank_order_and_scale():
    base = torch.arange(16, dtype=torch.float64).reshape(1, 4, 4)
    reverse = base.flip(-1).flip(-2)
    soft = AttributionRankLoss(mode='rank', loss_weight=1.)
    # same order (the teacher on another scale) vs reversed order
    same = soft(base, 3 * base + 1)
    assert same.item() < 0.1 * soft(reverse, base).item()
    # a small temperature makes the soft ranks hard: ~0 for the same order
    sharp = AttributionRankLoss(mode='rank', tau=1e-3, loss_weight=1.)
    assert sharp(base, base + 5).item() < 1e-12
    # invariant to a positive scale of either map
    assert soft(7.5 * base, 6 * base + 2).item() == pytest.approx(
        same.item(), rel=1e-9)
    assert soft(reverse * 0.01, 42 * base).item() == pytest.approx(
        soft(reverse, base).item(), rel=1e-9)


def test_hierarchical_by_hand():
    # teacher: the top-left 2x2 block is 1; student: all ones; p = 1.
    t = torch.zeros(1, 4, 4, dtype=torch.float64)
    t[:, :2, :2] = 1
    s = torch.ones(1, 4, 4, dtype=torch.float64)
    # full map: norm(t) = 1/2 on 4 pixels, norm(s) = 1/4 on 16 pixels,
    # a.b = 1/2 -> ||a - b||^2 = 1, mean over 16 pixels = 1/16.
    # 2x2 level: t -> (1, 0, 0, 0), s -> 1/2 each, a.b = 1/2 -> 1, / 4.
    # Levels averaged: (1/16 + 1/4) / 2 = 0.15625.
    loss = AttributionRankLoss(
        mode='hierarchical', pnorm=1., groups=(2, ), loss_weight=1.)
    assert loss(s, t).item() == pytest.approx(0.15625, rel=1e-12)
    # a 4x4 level equals the full map on a 4x4 map and is skipped
    loss = AttributionRankLoss(
        mode='hierarchical', pnorm=1., groups=(2, 4), loss_weight=1.)
    assert loss(s, t).item() == pytest.approx(0.15625, rel=1e-12)
    # (N, 1, H, W) maps give the same value
    assert loss(s[:, None], t[:, None]).item() == pytest.approx(
        0.15625, rel=1e-12)
    # with no pooled level it is the plain pnorm loss (1/16)
    loss = AttributionRankLoss(
        mode='hierarchical', pnorm=1., groups=(8, ), loss_weight=1.)
    assert loss(s, t).item() == pytest.approx(0.0625, rel=1e-12)


@pytest.mark.parametrize('mode', AttributionRankLoss.MODES)
def test_all_zero_maps(mode):
    s = torch.zeros(2, 4, 4, requires_grad=True)
    t = torch.zeros(2, 4, 4)
    t[1, 0, 0] = 1.  # one sample with a zero teacher, one without
    loss = AttributionRankLoss(mode=mode, product=24.)
    value = loss(s, t, capacity=0.1)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(s.grad).all()
    if mode == 'pnorm':
        # sample 0: both zero; sample 1: norm(t) is one-hot, norm(s) = 0,
        # so the loss is 40 * 1 / (2 * 16).
        assert value.item() == pytest.approx(40 / 32)


def test_complexity_loss_by_hand():
    # expected cost at init = 206.25 first-conv MACs (the released code's figure):
    # 3e-4 * 206.25 = 0.061875, d/dC = 3e-4 / 10000 = 3e-8.
    cost = torch.tensor(2_062_500., dtype=torch.float64, requires_grad=True)
    loss = ComplexityLoss()
    value = loss(cost, 10_000)
    assert value.item() == pytest.approx(0.061875, rel=1e-12)
    value.backward()
    assert cost.grad.item() == pytest.approx(3e-8, rel=1e-12)
    assert ComplexityLoss(loss_weight=1e-5)(
        2_062_500., torch.tensor(10_000.)).item() == pytest.approx(
            206.25e-5, rel=1e-6)
    with pytest.raises(ValueError, match='positive'):
        loss(cost, 0)


def test_complexity_loss_against_the_budget():
    loss = ComplexityLoss(loss_weight=2.0, mode='budget')
    # 1.5 x the budget: 2 * (1.5 - 1) ** 2 = 0.5; d/dC = 2 * 2 * 0.5 / B
    cost = torch.tensor(1500., dtype=torch.float64, requires_grad=True)
    value = loss(cost, 10, budget=1000.)
    assert value.item() == pytest.approx(0.5, rel=1e-12)
    value.backward()
    assert cost.grad.item() == pytest.approx(2e-3, rel=1e-12)
    # at or under the budget: no loss and no gradient (the reference MACs
    # play no part)
    for c in (1000., 400.):
        cost = torch.tensor(c, dtype=torch.float64, requires_grad=True)
        value = loss(cost, 10, budget=1000.)
        value.backward()
        assert value.item() == 0 and cost.grad.item() == 0
    with pytest.raises(ValueError, match="needs a positive budget"):
        loss(torch.tensor(1.), 10)
    with pytest.raises(ValueError, match="mode must be one of"):
        ComplexityLoss(mode='target')
