"""Tests of gmpq_mm.quantization.complexity (MACs, BitOPs, size)."""
import math

import pytest
import torch
from torch import nn

from gmpq_mm.quantization.complexity import (LayerMacs, bitops,
                                             complexity_report, count_macs,
                                             expected_bitops, format_table,
                                             human_units)
from gmpq_mm.quantization.convert import (select_layers, to_mixed_precision,
                                          to_quantized)

backbones = pytest.importorskip('mmpretrain.models.backbones')
torchvision = pytest.importorskip('torchvision')

# ResNet-18 at 32x32 (CIFAR stem: 3x3 stride 1, no max-pool).
FIRST_CONV_MACS = 64 * 64 * 9 * 32 * 32  # layer1.0.conv1 = 37,748,736
CIFAR_R18_SEARCHED_MACS = 553_648_128
CIFAR_STEM_MACS = 3 * 64 * 9 * 32 * 32


class ImageNetResNet18(nn.Module):
    """mmpretrain ResNet-18 backbone + GAP + a 1000-class linear."""

    def __init__(self):
        super().__init__()
        self.backbone = backbones.ResNet(depth=18)
        self.fc = nn.Linear(512, 1000)

    def forward(self, x):
        return self.fc(self.backbone(x)[-1].mean((2, 3)))


def test_toy_macs_by_hand():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),  # 8x8 -> 4x4
        nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False),
        nn.Flatten(2),  # (1, 8, 16)
        nn.Linear(16, 5))  # applied to each of the 8 rows
    macs = count_macs(model, (3, 8, 8))
    assert list(macs) == ['0', '1', '3']
    assert macs['0'] == LayerMacs(3 * 8 * 9 * 4 * 4, 8 * 3 * 9 + 8, 'conv')
    assert macs['1'] == LayerMacs(2 * 8 * 9 * 4 * 4, 8 * 2 * 9, 'conv')
    assert macs['3'] == LayerMacs(8 * 16 * 5, 16 * 5 + 5, 'linear')
    assert bitops(macs, {'0': (4, 2), '3': (8, 8)}) == 3456 * 8 + 640 * 64
    with pytest.raises(ValueError, match='nope'):
        bitops(macs, {'nope': (4, 4)})


def test_count_macs_restores_mode_and_stats():
    model = backbones.ResNet_CIFAR(depth=18)
    model.train()  # mmpretrain's ResNet.train() returns None
    model.layer1.eval()
    mean = model.bn1.running_mean.clone()
    count_macs(model, (3, 32, 32))
    assert model.training and model.layer2.training
    assert not model.layer1.training
    assert torch.equal(model.bn1.running_mean, mean)


def test_cifar_resnet18_searched_macs_and_init_cost():
    model = backbones.ResNet_CIFAR(depth=18)
    macs = count_macs(model, (3, 32, 32))
    names = select_layers(model)
    assert macs['conv1'].macs == CIFAR_STEM_MACS
    assert macs['layer1.0.conv1'].macs == FIRST_CONV_MACS
    # stride-2 conv of stage 2: 64 -> 128 channels at 16x16
    assert macs['layer2.0.conv1'].macs == 64 * 128 * 9 * 16 * 16
    assert macs['layer2.0.downsample.0'].macs == 64 * 128 * 16 * 16
    total = sum(macs[n].macs for n in names)
    assert total == CIFAR_R18_SEARCHED_MACS  # the released code's 553.6 MMACs

    # Uniform alphas over w2346a2346: E[b] = 3.75, so the normalised
    # expected cost is 3.75^2 * 553.6M / 37.7M = 206.25 (the released code's figure).
    to_mixed_precision(model, (2, 3, 4, 6), (2, 3, 4, 6))
    cost = expected_bitops(model, macs, normalize=True)
    assert cost.dim() == 0
    assert cost.item() == pytest.approx(206.25, rel=1e-6)
    assert expected_bitops(model, macs).item() == pytest.approx(
        3.75**2 * CIFAR_R18_SEARCHED_MACS, rel=1e-6)
    cost.backward()
    layer = model.layer3[0].conv2
    assert layer.alpha_w.grad is not None and layer.alpha_a.grad is not None
    assert layer.weight.grad is None and layer.act_ranges.grad is None
    # A layer with more MACs gets a larger push towards fewer bits.
    assert (model.layer1[0].conv1.alpha_w.grad[0]
            < model.layer1[0].conv1.alpha_w.grad[-1])


def _torchvision_macs(model, input_shape):
    """Independent count: output shapes by hooks, arithmetic from attrs."""
    shapes = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: shapes.
                                __setitem__(name, tuple(out.shape)))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    for h in hooks:
        h.remove()
    result = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            _, c_out, h_out, w_out = shapes[name]
            kh, kw = m.kernel_size
            result[name] = (m.in_channels // m.groups) * c_out * kh * kw \
                * h_out * w_out
        elif isinstance(m, nn.Linear):
            result[name] = m.in_features * m.out_features
    return result


def test_imagenet_resnet18_macs_bitops_size():
    tv = _torchvision_macs(torchvision.models.resnet18(), (3, 224, 224))
    model = ImageNetResNet18()
    macs = count_macs(model, (3, 224, 224))
    ours = {name.replace('backbone.', ''): v.macs for name, v in macs.items()}
    assert ours == tv  # same 21 layers, same MACs each
    assert len(ours) == 21
    assert ours['conv1'] == 3 * 64 * 49 * 112 * 112
    assert ours['layer4.1.conv2'] == 512 * 512 * 9 * 7 * 7
    total = sum(tv.values())
    assert total == 1_814_073_344  # ~1.81 GMACs
    assert sum(macs[n].macs for n in select_layers(model)) == \
        total - ours['conv1'] - ours['fc']

    report = complexity_report(model, (3, 224, 224))
    t = report['totals']
    assert t['macs'] == total
    assert t['quantized_macs'] == 0 and t['bitops_quantized'] == 0
    assert t['bitops_total'] == total * 1024
    # paper: 1853.4 GBitOPs = 1.81 GMACs (rounded) * 1024
    assert t['bitops_total'] / 1e9 == pytest.approx(1853.4, rel=5e-3)
    # paper: 46.8 MB = 11,689,512 params * 4 bytes / 1e6
    assert sum(p.numel() for p in model.parameters()) == 11_689_512
    assert round(t['size_mb'], 1) == 46.8 and t['fp_size_mb'] == t['size_mb']
    assert t['compression'] == 1.0


def test_uniform_w4a4_report():
    model = backbones.ResNet_CIFAR(depth=18)
    fp_params = sum(p.numel() for p in model.parameters())
    to_quantized(model, (4, 4))
    report = complexity_report(model, (3, 32, 32))
    t = report['totals']
    assert t['quantized_macs'] == CIFAR_R18_SEARCHED_MACS
    assert t['bitops_quantized'] == 16 * CIFAR_R18_SEARCHED_MACS
    assert t['bitops_total'] == (16 * CIFAR_R18_SEARCHED_MACS +
                                 1024 * CIFAR_STEM_MACS)
    assert t['compression_quantized'] == 64.0
    assert t['num_quantized'] == 19 and t['mean_w_bits'] == 4
    # quantized conv weights at 4 bits, everything else (stem, BN, the
    # layers' activation ranges) at 32 bits
    q_weights = sum(m.weight.numel() for m in model.modules()
                    if hasattr(m, 'bits'))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == fp_params + 19  # one activation range per layer
    assert t['size_mb'] == pytest.approx(
        (q_weights * 4 + (n_params - q_weights) * 32) / 8 / 1e6)
    rows = {r['name']: r for r in report['layers']}
    assert rows['conv1']['w_bits'] == 32 and not rows['conv1']['quantized']
    assert rows['layer1.0.conv1']['bitops'] == 16 * FIRST_CONV_MACS

    # the same numbers from a policy applied to the FP network
    fp = backbones.ResNet_CIFAR(depth=18)
    policy = {n: (4, 4) for n in select_layers(fp)}
    t2 = complexity_report(fp, (3, 32, 32), policy_layers=policy)['totals']
    assert t2['bitops_quantized'] == t['bitops_quantized']
    assert t2['bitops_total'] == t['bitops_total']
    with pytest.raises(TypeError, match='policy_layers'):
        complexity_report(fp, (3, 32, 32), policy_layers=(4, 4))
    with pytest.raises(ValueError, match='layer9'):
        complexity_report(fp, (3, 32, 32), policy_layers={'layer9': (4, 4)})

    text = format_table(report)
    assert 'layer4.1.conv2' in text and '37.75M' in text
    assert '8.86G' in text  # 16 * 553.6M quantized BitOPs
    assert 'compression 64.00x' in text


def test_supernet_report_uses_expected_bits():
    model = backbones.ResNet_CIFAR(depth=18)
    to_mixed_precision(model, (2, 4), (2, 4))
    # at 16x16 every feature map has a quarter of the 32x32 positions
    t = complexity_report(model, (3, 16, 16))['totals']
    assert t['quantized_macs'] * 4 == CIFAR_R18_SEARCHED_MACS
    # uniform probabilities: E[b_w] = E[b_a] = 3
    assert t['bitops_quantized'] == pytest.approx(9 * t['quantized_macs'])
    assert t['mean_a_bits'] == pytest.approx(3.0)


def test_human_units():
    assert human_units(553_648_128) == '553.65M'
    assert human_units(1_853_440_000_000) == '1.85T'
    assert human_units(2_000) == '2.00K'
    assert human_units(12) == '12'
    assert math.isclose(float(human_units(0.5)), 0.5)
