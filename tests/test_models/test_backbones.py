"""MixedPrecisionBackbone / QuantizedBackbone built through the registry."""
import json
import re

import pytest
import torch
from mmengine.registry import init_default_scope
from torch import nn

from gmpq_mm.quantization.convert import policy_from_model
from gmpq_mm.quantization.layers import (MixedPrecisionConv2d, QuantizedConv2d,
                                         is_mixed_layer, is_quantized_layer)
from gmpq_mm.quantization.policy import make_policy, save_policy
from gmpq_mm.registry import MODELS
from gmpq_mm.utils import register_all_modules

register_all_modules()

init_default_scope('mmpretrain')

R18_CIFAR = dict(type='ResNet_CIFAR', depth=18)
R18_IMAGENET = dict(type='ResNet', depth=18)

# The 19 searched convs of ResNet-18 (CIFAR and ImageNet stems alike).
R18_LAYERS = ([
    'layer1.0.conv1', 'layer1.0.conv2', 'layer1.1.conv1', 'layer1.1.conv2'
] + [
    f'layer{s}.{name}' for s in (2, 3, 4)
    for name in ('0.conv1', '0.conv2', '0.downsample.0', '1.conv1', '1.conv2')
])
# Parameters / buffers the wrappers add to each quantized conv.
MIXED_KEYS = ('alpha_w', 'alpha_a', 'act_ranges')
QUANT_KEYS = ('act_range', 'w_threshold')


def mixed_names(model):
    return [n for n, m in model.named_modules() if is_mixed_layer(m)]


def quant_names(model):
    return [n for n, m in model.named_modules() if is_quantized_layer(m)]


def build(cfg):
    return MODELS.build(cfg)


def forward(model, shape):
    """One eval-mode, no-grad forward of a random batch (kept small: the
    tests only check that it runs and what comes out)."""
    model.eval()
    with torch.no_grad():
        return model(torch.randn(shape))


def w4a4_policy_file(tmp_path, names=R18_LAYERS, name='w4a4.json'):
    path = tmp_path / name
    save_policy(make_policy({n: (4, 4) for n in names}), path)
    return str(path)


# ---------------------------------------------------------------------------
# Layer choice
# ---------------------------------------------------------------------------
def test_resnet18_cifar_supernet_layers():
    model = build(
        dict(
            type='MixedPrecisionBackbone',
            backbone=R18_CIFAR,
            w_bits=[2, 3, 4, 6],
            a_bits=[2, 3, 4, 6]))
    assert type(model).__name__ == 'ResNet_CIFAR'  # a builder, not a wrapper
    assert mixed_names(model) == R18_LAYERS
    # Stem stays FP; every searched layer knows its name and candidates.
    assert type(model.conv1) is nn.Conv2d
    for name in R18_LAYERS:
        layer = model.get_submodule(name)
        assert isinstance(layer, MixedPrecisionConv2d)
        assert layer.layer_name == name
        assert layer.w_candidates == (2, 3, 4, 6)
        assert not layer.signed  # 'auto': ResNet inputs follow a ReLU
    out = forward(model, (1, 3, 16, 16))
    assert out[-1].shape == (1, 512, 2, 2)


def test_resnet50_supernet_has_52_layers():
    model = build(
        dict(
            type='MixedPrecisionBackbone',
            backbone=dict(type='ResNet', depth=50),
            w_bits=[2, 4],
            a_bits=[2, 4],
            signed=False))
    names = mixed_names(model)
    assert len(names) == 52
    assert sum(n.endswith('downsample.0') for n in names) == 4
    assert 'conv1' not in names and names[0] == 'layer1.0.conv1'
    assert names[-1] == 'layer4.2.conv3'


@pytest.mark.parametrize('wrapper', ['MixedPrecisionBackbone', 'Quantized'])
def test_resnet18_imagenet_stem_same_layers(wrapper):
    cfg = dict(
        type='MixedPrecisionBackbone', backbone=R18_IMAGENET, signed=False)
    if wrapper == 'Quantized':
        cfg = dict(
            type='QuantizedBackbone',
            backbone=R18_IMAGENET,
            w_bits=4,
            a_bits=3,
            signed=False)
    model = build(cfg)
    assert type(model).__name__ == 'ResNet'
    names = (
        mixed_names(model) if wrapper != 'Quantized' else quant_names(model))
    assert names == R18_LAYERS
    assert type(model.conv1) is nn.Conv2d and model.conv1.kernel_size == (7, 7)
    if wrapper == 'Quantized':
        assert all(model.get_submodule(n).bits == (4, 3) for n in R18_LAYERS)
    out = forward(model, (1, 3, 32, 32))
    assert out[-1].shape == (1, 512, 1, 1)


def test_mobilenetv2_signed_auto():
    model = build(
        dict(
            type='MixedPrecisionBackbone',
            backbone=dict(type='MobileNetV2'),
            w_bits=[2, 4],
            a_bits=[2, 4],
            signed='auto'))
    layers = {n: m for n, m in model.named_modules() if is_mixed_layer(m)}
    assert 'conv1.conv' not in layers and len(layers) == 51
    signed = {n for n, m in layers.items() if m.signed}
    # Inputs that can be negative: the 1x1 expansion of every block fed by
    # a linear bottleneck (all blocks but the first, expand_ratio 1) and the
    # final 1x1 conv; every depthwise / projection conv follows a ReLU6.
    expected = {
        n
        for n in layers if re.fullmatch(r'layer\d+\.\d+\.conv\.0\.conv', n)
        and n.replace('conv.0.conv', 'conv.2.conv') in layers
    } | {'conv2.conv'}
    assert len(expected) == 17
    assert signed == expected
    out = forward(model, (1, 3, 32, 32))
    assert out[-1].shape == (1, 1280, 1, 1)
    assert torch.isfinite(out[-1]).all()


# ---------------------------------------------------------------------------
# FP checkpoints
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('cfg, keys', [
    (dict(type='MixedPrecisionBackbone', backbone=R18_CIFAR,
          signed=False), MIXED_KEYS),
    (dict(
        type='QuantizedBackbone',
        backbone=R18_CIFAR,
        w_bits=4,
        a_bits=4,
        signed=False), QUANT_KEYS),
])
def test_fp_checkpoint_loads(tmp_path, cfg, keys):
    torch.manual_seed(0)
    fp = build(R18_CIFAR)
    ckpt = tmp_path / 'fp.pth'
    torch.save(fp.state_dict(), ckpt)

    model = build(cfg)
    result = model.load_state_dict(
        torch.load(ckpt, weights_only=True), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(f'{n}.{k}' for n in R18_LAYERS
                                                 for k in keys)
    state = model.state_dict()
    for key, value in fp.state_dict().items():
        assert torch.equal(state[key], value), key


# ---------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------
def test_cifar_policy_applies_to_imagenet_stem(tmp_path):
    supernet = build(
        dict(
            type='MixedPrecisionBackbone',
            backbone=R18_CIFAR,
            w_bits=[2, 3, 4, 6],
            a_bits=[2, 3, 4, 6],
            signed=False))
    # A varied argmax choice per layer.
    with torch.no_grad():
        for i, name in enumerate(R18_LAYERS):
            layer = supernet.get_submodule(name)
            layer.alpha_w[i % 4] += 1.0
            layer.alpha_a[(i // 4) % 4] += 1.0
    path = tmp_path / 'policy.json'
    save_policy(policy_from_model(supernet, input_shape=(3, 32, 32)), path)
    layers = json.loads(path.read_text())['layers']
    assert list(layers) == R18_LAYERS
    assert len({(v['w_bits'], v['a_bits']) for v in layers.values()}) > 4

    model = build(
        dict(
            type='QuantizedBackbone',
            backbone=R18_IMAGENET,
            policy=str(path),
            signed=False))
    assert quant_names(model) == R18_LAYERS
    for name, bits in layers.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantizedConv2d)
        assert layer.bits == (bits['w_bits'], bits['a_bits']), name
    # A dict policy works the same.
    model = build(
        dict(
            type='QuantizedBackbone',
            backbone=R18_IMAGENET,
            policy=json.loads(path.read_text()),
            signed=False))
    assert {
        n: model.get_submodule(n).bits
        for n in R18_LAYERS
    } == {
        n: (b['w_bits'], b['a_bits'])
        for n, b in layers.items()
    }
    out = forward(model, (1, 3, 32, 32))
    assert out[-1].shape == (1, 512, 1, 1)


def _bad_policy(tmp_path, kind):
    policy = make_policy({n: (4, 4) for n in R18_LAYERS})
    path = tmp_path / f'{kind}.json'
    if kind == 'missing':
        del policy['layers']['layer3.0.downsample.0']
        layer = 'layer3.0.downsample.0'
    elif kind == 'extra':
        policy['layers']['layer5.0.conv1'] = {'w_bits': 4, 'a_bits': 4}
        layer = 'layer5.0.conv1'
    elif kind == 'stem':
        policy['layers']['conv1'] = {'w_bits': 4, 'a_bits': 4}
        layer = 'conv1'
    elif kind == 'bits9':
        policy['layers']['layer2.1.conv2']['w_bits'] = 9
        layer = 'layer2.1.conv2'
    if kind == 'malformed':
        path.write_text('{"format": "gmpq-policy", "layers": {,}')
        return str(path), 'line 1'
    path.write_text(json.dumps(policy))
    return str(path), layer


@pytest.mark.parametrize('kind',
                         ['missing', 'extra', 'stem', 'bits9', 'malformed'])
def test_bad_policy_raises_at_build(tmp_path, kind):
    path, what = _bad_policy(tmp_path, kind)
    with pytest.raises(ValueError) as info:
        build(dict(type='QuantizedBackbone', backbone=R18_CIFAR, policy=path))
    msg = str(info.value)
    assert path in msg and what in msg, msg
    if kind == 'bits9':
        assert '9' in msg
    if kind == 'malformed':
        assert 'JSON' in msg


def test_missing_policy_file(tmp_path):
    path = str(tmp_path / 'nope.json')
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        build(dict(type='QuantizedBackbone', backbone=R18_CIFAR, policy=path))


@pytest.mark.parametrize('kwargs', [
    dict(w_bits=4, a_bits=4, policy='P'),
    dict(w_bits=4, policy='P'),
    dict(),
    dict(w_bits=4),
])
def test_policy_xor_uniform_bits(tmp_path, kwargs):
    if kwargs.get('policy') == 'P':
        kwargs['policy'] = w4a4_policy_file(tmp_path)
    with pytest.raises(ValueError, match='w_bits'):
        build(dict(type='QuantizedBackbone', backbone=R18_CIFAR, **kwargs))


def test_uniform_bits_checked():
    with pytest.raises(ValueError, match='9'):
        build(
            dict(
                type='QuantizedBackbone',
                backbone=R18_CIFAR,
                w_bits=9,
                a_bits=4))
