"""Tests of gmpq_mm.quantization.convert (module selection and swapping)."""
import pytest
import torch
from torch import nn

from gmpq_mm.quantization.convert import (detect_signed_inputs, replace_layers,
                                          select_layers, to_mixed_precision,
                                          to_quantized)
from gmpq_mm.quantization.layers import (MixedPrecisionConv2d,
                                         MixedPrecisionLinear, QuantizedConv2d,
                                         QuantizedLinear)
from gmpq_mm.quantization.probe import eval_mode

backbones = pytest.importorskip('mmpretrain.models.backbones')


def resnet18_cifar_names():
    """The 19 searched convs of ResNet-18, written out by hand."""
    names = []
    for stage in range(1, 5):
        for block in range(2):
            names += [
                f'layer{stage}.{block}.conv1', f'layer{stage}.{block}.conv2'
            ]
            if stage > 1 and block == 0:
                names.append(f'layer{stage}.0.downsample.0')
    return names


class Toy(nn.Module):
    """conv(stem) -> relu -> conv -> conv -> pool -> linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.body = nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 6, 1))
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.body(self.relu(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def test_select_resnet18_cifar():
    model = backbones.ResNet_CIFAR(depth=18)
    names = select_layers(model)
    assert names == resnet18_cifar_names()
    assert len(names) == 19 and 'conv1' not in names
    with_stem = select_layers(model, skip_stem=False)
    assert with_stem == ['conv1'] + names


def test_select_resnet50():
    names = select_layers(backbones.ResNet(depth=50))
    assert len(names) == 52
    assert sum(n.endswith('downsample.0') for n in names) == 4
    assert 'conv1' not in names and names[0] == 'layer1.0.conv1'


def test_select_patterns():
    model = backbones.ResNet_CIFAR(depth=18)
    assert select_layers(
        model, include='layer1.*') == [
            'layer1.0.conv1', 'layer1.0.conv2', 'layer1.1.conv1',
            'layer1.1.conv2'
        ]
    no_down = select_layers(model, exclude=['*downsample*'])
    assert len(no_down) == 16
    # exclude wins over include
    assert select_layers(
        model, include=['layer4.*'], exclude=['layer4.1.*']) == [
            'layer4.0.conv1', 'layer4.0.conv2', 'layer4.0.downsample.0'
        ]
    # excluding the stem explicitly is not an error (it is a conv)
    assert select_layers(model, exclude=['conv1']) == resnet18_cifar_names()


def test_select_typo_is_an_error():
    model = backbones.ResNet_CIFAR(depth=18)
    with pytest.raises(ValueError, match=r"include 'layr1\.\*'"):
        select_layers(model, include=['layer2.*', 'layr1.*'])
    with pytest.raises(ValueError, match=r"exclude 'fc'"):
        select_layers(model, exclude=['fc'])
    # matches a module, but not one of the selectable types
    with pytest.raises(ValueError, match='bn1'):
        select_layers(model, include=['bn1'])


def test_select_types_and_empty():
    model = Toy()
    assert select_layers(model) == ['body.0', 'body.1']
    assert select_layers(
        model, types=(nn.Conv2d, nn.Linear)) == ['body.0', 'body.1', 'fc']
    assert select_layers(model, types=(nn.Linear, )) == ['fc']
    with pytest.raises(ValueError, match='no layer'):
        select_layers(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_replace_layers_keeps_names():
    model = Toy()
    before = [n for n, _ in model.named_modules()]
    replace_layers(model, lambda name, m: nn.Identity(), ['body.0', 'fc'])
    assert isinstance(model.body[0], nn.Identity)
    assert isinstance(model.fc, nn.Identity)
    assert [n for n, _ in model.named_modules()] == before
    model = Toy()
    with pytest.raises(ValueError, match='body.7'):
        replace_layers(model, lambda name, m: nn.Identity(),
                       ['body.0', 'body.7'])
    # nothing was replaced before the unknown name was found
    assert isinstance(model.body[0], nn.Conv2d)


def test_to_mixed_precision_resnet():
    model = backbones.ResNet_CIFAR(depth=18)
    weights = {n: p for n, p in model.named_parameters()}
    keys = set(model.state_dict())
    to_mixed_precision(model, (2, 3, 4, 6), (2, 3, 4), alpha_init=0.5)
    modules = dict(model.named_modules())
    for name in resnet18_cifar_names():
        layer = modules[name]
        assert isinstance(layer, MixedPrecisionConv2d)
        assert layer.layer_name == name
        assert layer.w_candidates == (2, 3, 4, 6)
        assert layer.a_candidates == (2, 3, 4)
        assert torch.allclose(layer.alpha_w, torch.full((4, ), 0.5))
        # the very same Parameter objects, under the same names
        assert layer.weight is weights[f'{name}.weight']
    assert type(modules['conv1']) is nn.Conv2d
    assert keys <= set(model.state_dict())
    out = model(torch.randn(1, 3, 16, 16))
    assert out[-1].shape == (1, 512, 2, 2)
    with pytest.raises(ValueError, match='already'):
        to_mixed_precision(model, (2, 4), (2, 4), names=['layer1.0.conv1'])


def test_to_quantized_policy_and_uniform():
    model = Toy()
    to_quantized(model, {'fc': (8, 8), 'body.0': {'w_bits': 4, 'a_bits': 3}})
    assert isinstance(model.body[0], QuantizedConv2d)
    assert model.body[0].bits == (4, 3)
    assert model.body[0].layer_name == 'body.0'
    assert isinstance(model.fc, QuantizedLinear) and model.fc.bits == (8, 8)
    assert type(model.body[1]) is nn.Conv2d

    model = Toy()
    to_quantized(model, (4, 4))
    assert [
        n for n, m in model.named_modules() if isinstance(m, QuantizedConv2d)
    ] == ['body.0', 'body.1']

    with pytest.raises(ValueError, match='missing'):
        to_quantized(Toy(), {'body.0': (4, 4)}, names=['body.0', 'body.1'])
    with pytest.raises(ValueError, match='body.9'):
        to_quantized(Toy(), {'body.9': (4, 4)})
    with pytest.raises(ValueError, match='9'):
        to_quantized(Toy(), {'body.0': (9, 4)})

    model = Toy()
    to_mixed_precision(
        model, (2, 4), (2, 4), names=['body.1', 'fc'], signed={'fc': True})
    assert isinstance(model.fc, MixedPrecisionLinear) and model.fc.signed
    assert not model.body[1].signed
    with pytest.raises(ValueError, match='body.0'):
        to_mixed_precision(
            Toy(), (2, 4), (2, 4), names=['fc'], signed={'body.0': True})


def test_signed_auto_toy():
    """stem -> relu -> body.0 (input >= 0) -> body.1 (input of any sign)."""
    model = Toy().train()
    signed = detect_signed_inputs(model, ['body.0', 'body.1', 'fc'])
    assert signed == {'body.0': False, 'body.1': True, 'fc': True}
    assert model.training and model.body.training
    to_mixed_precision(model, (2, 4), (2, 4), signed='auto')
    assert not model.body[0].signed and model.body[1].signed
    with pytest.raises(ValueError, match='auto'):
        to_mixed_precision(Toy(), (2, 4), (2, 4), signed='yes')


def test_signed_auto_mobilenet_v2_and_resnet():
    model = backbones.MobileNetV2()
    model.train()
    model.layer1.eval()  # a frozen part must stay frozen after the probe
    names = select_layers(model)
    signed = detect_signed_inputs(model, names)
    # The expand conv of every block after the first reads the previous
    # block's linear bottleneck (or a residual sum of them); the last 1x1
    # conv reads the output of the last linear bottleneck.
    blocks = {2: 2, 3: 3, 4: 4, 5: 3, 6: 3, 7: 1}
    expected = {
        f'layer{s}.{b}.conv.0.conv'
        for s, n in blocks.items()
        for b in range(n)
    } | {'conv2.conv'}
    assert {n for n, s in signed.items() if s} == expected
    assert model.training and not model.layer1.training
    # depthwise and projection convs follow a ReLU6
    assert not signed['layer2.0.conv.1.conv']
    assert not signed['layer2.0.conv.2.conv']

    to_quantized(model, (4, 4), signed='auto')
    modules = dict(model.named_modules())
    assert {n for n in names if modules[n].signed} == expected

    resnet = backbones.ResNet_CIFAR(depth=18)
    assert not any(
        detect_signed_inputs(resnet, select_layers(resnet)).values())


def test_eval_mode_restores():
    model = Toy().train()
    model.body.eval()
    with eval_mode(model):
        assert not model.training and not torch.is_grad_enabled()
    assert model.training and not model.body.training
    assert model.stem.training
