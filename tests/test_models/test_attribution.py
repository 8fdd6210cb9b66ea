# Copyright (c) gmpq_mm contributors. All rights reserved.
import pytest
import torch
import torch.nn as nn
from mmpretrain.models.heads import LinearClsHead
from mmpretrain.registry import MODELS

from gmpq_mm.models.utils import (attribution, attribution_map,
                                  class_activation_map,
                                  gradient_attribution_map)


@pytest.fixture
def gap_linear():
    torch.manual_seed(0)
    neck = MODELS.build(dict(type='GlobalAveragePooling'))
    head = MODELS.build(
        dict(type='LinearClsHead', num_classes=10, in_channels=8))
    head.init_weights()
    nn.init.normal_(head.fc.weight)  # std 0.01 init would give tiny maps
    return neck.eval(), head.eval()


@pytest.fixture
def feat():
    # non-square, positive and negative values
    torch.manual_seed(1)
    return torch.randn(3, 8, 4, 5, dtype=torch.float32)


def _logits_fn(neck, head):
    return lambda x: head(neck((x, )))


def _no_param_grads(*modules):
    return all(p.grad is None for m in modules for p in m.parameters())


def test_cam_by_hand():
    # W[c^] = (1, -2); channel 0 = (1, 3), channel 1 = (1, 0.5) on a 1x2 map:
    # 1*(1, 3) - 2*(1, 0.5) = (-1, 2) -> ReLU -> (0, 2). No 1/(H*W) factor.
    feat = torch.tensor([[[[1., 3.]], [[1., 0.5]]]])
    weight = torch.tensor([[0., 0.], [1., -2.]])
    cam = class_activation_map(feat, weight, 1)
    assert cam.shape == (1, 1, 2)
    torch.testing.assert_close(cam, torch.tensor([[[0., 2.]]]))


def test_closed_form_equals_autograd(gap_linear, feat):
    neck, head = gap_linear
    cam_grad, logits = gradient_attribution_map(feat, _logits_fn(neck, head))
    assert cam_grad.shape == (3, 4, 5)
    assert (cam_grad > 0).any() and (cam_grad == 0).any()
    cam = class_activation_map(feat, head.fc.weight, logits.argmax(1))
    torch.testing.assert_close(cam, cam_grad, rtol=1e-5, atol=1e-6)
    # a given class, as an int and as a per-sample tensor
    for idx in (7, torch.tensor([2, 0, 9])):
        cam_grad, _ = gradient_attribution_map(
            feat, _logits_fn(neck, head), class_idx=idx)
        cam = class_activation_map(feat, head.fc.weight, idx)
        torch.testing.assert_close(cam, cam_grad, rtol=1e-5, atol=1e-6)
    assert _no_param_grads(neck, head)


def test_dispatch_closed_form(gap_linear, feat, monkeypatch):
    neck, head = gap_linear
    calls = []
    real = attribution.gradient_attribution_map
    monkeypatch.setattr(attribution, 'gradient_attribution_map',
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    logits = head(neck((feat, )))
    cam = attribution_map(feat, neck, head)
    assert not calls
    torch.testing.assert_close(
        cam, class_activation_map(feat, head.fc.weight, logits.argmax(1)))
    # given logits select the class; a backbone tuple is accepted
    fake = torch.zeros(3, 10)
    fake[:, 4] = 1
    torch.testing.assert_close(
        attribution_map((feat * 2, feat), neck, head, logits=fake),
        class_activation_map(feat, head.fc.weight, 4))
    assert not calls

    # a LinearClsHead subclass with its own forward is not a plain fc
    class ScaledHead(LinearClsHead):

        def forward(self, feats):
            return 2 * super().forward(feats)

    scaled = ScaledHead(num_classes=10, in_channels=8)
    attribution_map(feat, neck, scaled)
    assert len(calls) == 1


class ConvHead(nn.Module):
    """A head with its own 1x1 conv and pooling, taking mmpretrain tuples."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 10)

    def forward(self, feats):
        x = torch.tanh(self.conv(feats[-1]))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize('use_custom', [False, True])
def test_gradient_path(gap_linear, feat, monkeypatch, use_custom):
    torch.manual_seed(2)
    if use_custom:
        neck, head = None, ConvHead()
    else:
        neck = gap_linear[0]
        head = MODELS.build(
            dict(
                type='StackedLinearClsHead',
                num_classes=10,
                in_channels=8,
                mid_channels=[16]))
    head.eval()
    calls = []
    real = attribution.gradient_attribution_map
    monkeypatch.setattr(attribution, 'gradient_attribution_map',
                        lambda *a, **k: calls.append(1) or real(*a, **k))

    feat = feat.clone().requires_grad_(True)
    cam = attribution_map(feat, neck, head)
    assert calls and cam.shape == (3, 4, 5)
    assert (cam > 0).any()
    # computing the map writes no .grad anywhere
    assert _no_param_grads(head) and feat.grad is None
    # create_graph: the map is differentiable wrt the feature and, through
    # the gradient weights, wrt the head parameters (second order)
    weight = head.fc.weight if use_custom else head.layers[-1].fc.weight
    g_feat, g_weight = torch.autograd.grad(cam.sum(), (feat, weight))
    assert g_feat.abs().sum() > 0 and g_weight.abs().sum() > 0
    assert _no_param_grads(head)

    # given logits select the class
    fake = torch.zeros(3, 10)
    fake[:, 5] = 1
    cam5, _ = real(
        feat,
        _logits_fn(neck, head) if neck else (lambda x: head((x, ))),
        class_idx=5)
    torch.testing.assert_close(
        attribution_map(feat, neck, head, logits=fake), cam5)

    # under no_grad (teacher) the map is the same and carries no graph
    with torch.no_grad():
        cam_ng = attribution_map(feat, neck, head)
    assert not cam_ng.requires_grad
    torch.testing.assert_close(cam_ng, cam.detach())
    assert _no_param_grads(head) and feat.grad is None


def test_closed_form_under_no_grad(gap_linear, feat):
    neck, head = gap_linear
    with torch.no_grad():
        cam = attribution_map(feat, neck, head)
    assert not cam.requires_grad
    torch.testing.assert_close(cam, attribution_map(feat, neck, head))


def test_bad_inputs(gap_linear):
    neck, head = gap_linear
    with pytest.raises(TypeError, match='N, C, H, W'):
        attribution_map(torch.randn(2, 8), neck, head)
    with pytest.raises(ValueError, match='class_idx'):
        class_activation_map(
            torch.randn(2, 8, 3, 3), head.fc.weight, torch.tensor([1, 2, 3]))
