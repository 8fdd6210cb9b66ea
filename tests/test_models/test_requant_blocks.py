"""QuantizedBackbone(requant_points=True): ResNet blocks with the 8-bit
points of the integer runtime, their forward, their checkpoints and their
ONNX export."""
import copy

import numpy as np
import pytest
import torch
from mmengine.registry import init_default_scope
from torch import nn

from gmpq_mm.models.utils.requant_blocks import (RequantBasicBlock,
                                                 RequantBottleneck)
from gmpq_mm.quantization.integer_fold import folded_bias_shift
from gmpq_mm.quantization.layers import QuantizedConv2d
from gmpq_mm.quantization.requant_point import RequantPoint
from gmpq_mm.registry import MODELS
from gmpq_mm.utils import register_all_modules

register_all_modules()
init_default_scope('mmpretrain')

R18_TINY = dict(
    type='ResNet_CIFAR',
    depth=18,
    in_channels=1,
    stem_channels=8,
    base_channels=8,
    out_indices=(3, ))
# (1, 28, 28) -> 64 channels at 4 x 4


def _backbone(requant_points=True, backbone=R18_TINY, **kwargs):
    kwargs.setdefault('w_bits', 2)
    kwargs.setdefault('a_bits', 2)
    return MODELS.build(
        dict(
            type='QuantizedBackbone',
            backbone=backbone,
            requant_points=requant_points,
            **kwargs))


def _point_keys():
    """The 20 point buffers of ResNet-18: branch + output of each of the 8
    blocks, the shortcut of the 3 downsampling blocks, the stem's output
    at the first block."""
    keys = ['layer1.0.requant_in']
    for stage in (1, 2, 3, 4):
        for i in (0, 1):
            keys.append(f'layer{stage}.{i}.requant_branch')
            if stage > 1 and i == 0:
                keys.append(f'layer{stage}.{i}.requant_shortcut')
            keys.append(f'layer{stage}.{i}.requant_out')
    return [f'{k}.point_range' for k in keys]


def _points(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, RequantPoint)]


def _train_steps(module, shape, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    module.train()
    with torch.no_grad():
        for _ in range(steps):
            module(torch.relu(torch.randn(shape, generator=gen)))
    return gen


# ---------------------------------------------------------------------------
# Structure and checkpoints
# ---------------------------------------------------------------------------
def test_resnet18_points_and_keys():
    model = _backbone()
    points = _points(model)
    assert len(points) == 20
    point_keys = [k for k in model.state_dict() if k.endswith('point_range')]
    assert sorted(point_keys) == sorted(_point_keys())
    blocks = [m for m in model.modules() if isinstance(m, RequantBasicBlock)]
    assert len(blocks) == 8
    for name in ('layer1', 'layer2', 'layer3', 'layer4'):
        assert all(
            type(b) is RequantBasicBlock for b in model.get_submodule(name))
    # signedness: int8 for branch and shortcut, uint8 after a ReLU
    kinds = {n: p.signed for n, p in points}
    assert not kinds['layer1.0.requant_in']
    assert kinds['layer2.0.requant_branch']
    assert kinds['layer2.0.requant_shortcut']
    assert not kinds['layer4.1.requant_out']
    # the other blocks have no input point, layer1 has no shortcut point
    assert model.layer1[1].requant_in is None
    assert model.layer1[0].requant_shortcut is None
    # everything else as without points: same keys, same parameters
    plain = _backbone(requant_points=False)
    assert set(model.state_dict()) - set(plain.state_dict()) == set(
        _point_keys())


def test_checkpoint_without_points_loads_non_strict():
    plain = _backbone(requant_points=False)
    model = _backbone()
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(_point_keys())
    assert all(k.endswith('point_range') for k in result.missing_keys)
    assert all(not p.calibrated for _, p in _points(model))


def test_bottleneck_resnet_gets_points():
    model = _backbone(
        backbone=dict(
            type='ResNet',
            depth=50,
            stem_channels=8,
            base_channels=8,
            out_indices=(3, )))
    blocks = [m for m in model.modules() if isinstance(m, RequantBottleneck)]
    assert len(blocks) == 3 + 4 + 6 + 3
    assert all(type(b) is RequantBottleneck for b in blocks)
    # 16 x (branch + out), 4 shortcuts (layer1 too: 8 -> 32 channels), 1 in
    assert len(_points(model)) == 16 * 2 + 4 + 1
    assert model.layer1[0].requant_shortcut is not None
    block = model.layer1[0]
    _train_steps(block, (2, 8, 8, 8), steps=2)
    assert all(p.calibrated for p in block.children()
               if isinstance(p, RequantPoint))
    block.eval()
    x = torch.relu(torch.randn(2, 8, 8, 8))
    with torch.no_grad():
        want = block(x)
        baked = copy.deepcopy(block)
        baked.bake_folded_bias()
        assert torch.allclose(baked(x), want, atol=1e-6)


def test_other_backbones_refused():
    with pytest.raises(ValueError, match='requant_points=True needs'):
        _backbone(
            backbone=dict(type='VGG', depth=11, num_classes=-1),
            w_bits=4,
            a_bits=4)


def test_activation_checkpointing_refused():
    with pytest.raises(ValueError, match='with_cp=True'):
        _backbone(backbone=dict(R18_TINY, with_cp=True))


def test_requant_points_must_be_bool():
    with pytest.raises(ValueError, match='requant_points must be True or'):
        _backbone(requant_points='yes')


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------
def _hand_forward(b, x, shifts=False):
    """mmpretrain's BasicBlock forward with the points put in by hand; with
    ``shifts`` each BatchNorm output gets its folded_bias_shift."""

    def conv_norm(conv, norm, t):
        out = norm(conv(t))
        if shifts:
            out = out + folded_bias_shift(conv, norm).reshape(1, -1, 1, 1)
        return out

    if b.requant_in is not None:
        x = b.requant_in(x)
    out = torch.relu(conv_norm(b.conv1, b.bn1, x))
    out = conv_norm(b.conv2, b.bn2, out)
    identity = x
    if b.downsample is not None:
        conv, norm = b.downsample
        identity = b.requant_shortcut(conv_norm(conv, norm, x))
    out = b.requant_branch(out) + identity
    return b.requant_out(torch.relu(out))


@pytest.mark.parametrize('name', ['layer1.0', 'layer2.0', 'layer2.1'])
def test_train_forward_by_hand(name):
    torch.manual_seed(0)
    block = _backbone().get_submodule(name).train()
    ref = copy.deepcopy(block)
    gen = torch.Generator().manual_seed(1)
    c_in = block.conv1.in_channels
    for _ in range(2):  # the second batch: EMA of the ranges
        x = torch.relu(torch.randn(4, c_in, 8, 8, generator=gen))
        with torch.no_grad():
            got = block(x)
            want = _hand_forward(ref, x)
        assert torch.equal(got, want)
    # the points saw the same tensors: same ranges, same BatchNorm stats
    state, ref_state = block.state_dict(), ref.state_dict()
    for key, value in state.items():
        assert torch.equal(value, ref_state[key]), key
    assert all(p.calibrated for p in block.children()
               if isinstance(p, RequantPoint))


@pytest.mark.parametrize('name', ['layer1.0', 'layer2.0'])
def test_eval_forward_emulates_int_bias(name):
    torch.manual_seed(0)
    block = _backbone().get_submodule(name)
    c_in = block.conv1.in_channels
    gen = _train_steps(block, (8, c_in, 8, 8))
    block.eval()
    x = torch.relu(torch.randn(8, c_in, 8, 8, generator=gen))
    pairs = block._conv_norms()
    assert len(pairs) == (3 if block.downsample is not None else 2)
    assert all(folded_bias_shift(c, n).abs().max() > 0 for c, n in pairs)
    with torch.no_grad():
        got = block(x)
        assert torch.allclose(got, _hand_forward(block, x, shifts=True))
        plain = copy.deepcopy(block)
        plain.emulate_int_bias = False
        unshifted = plain(x)
        assert torch.allclose(unshifted, _hand_forward(block, x))
        # the rounding is visible after the 8-bit points
        assert not torch.allclose(got, unshifted, atol=1e-3)
        baked = copy.deepcopy(block)
        baked.bake_folded_bias()
        assert baked.emulate_int_bias is False
        assert block.emulate_int_bias is True
        for (c, n), (_, bn) in zip(pairs, baked._conv_norms()):
            assert torch.allclose(bn.bias, n.bias + folded_bias_shift(c, n))
        assert torch.allclose(baked(x), got, atol=1e-6)


# ---------------------------------------------------------------------------
# ONNX export
# ---------------------------------------------------------------------------
class _Classifier(nn.Module):
    """backbone -> global average -> linear; ``export_onnx_model`` calls
    ``model(x, mode='tensor')``."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(64, 10)

    def forward(self, x, mode='tensor'):
        return self.fc(self.backbone(x)[-1].mean((2, 3)))


def _rel_l2(got, ref):
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.fixture(scope='module')
def trained_w2a2():
    """The W2A2 ResNet_CIFAR-18 with its 20 points: ranges calibrated, 4
    train-mode batches (BatchNorm statistics, point ranges), eval mode;
    and 64 inputs."""
    from gmpq_mm.quantization import calibrate_model
    torch.manual_seed(0)
    model = _Classifier(_backbone())
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 1, 28, 28, generator=gen) for _ in range(4)]
    calibrate_model(model, batches[:1], method='max')
    ranges = [
        m.act_range.item() for m in model.modules()
        if isinstance(m, QuantizedConv2d)
    ]
    assert len(ranges) == 19 and min(ranges) < 6.0
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # the average over the 4 batches
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    model.eval()
    assert all(p.calibrated for _, p in _points(model))
    x = torch.randn(64, 1, 28, 28, generator=gen).numpy()
    return model, x


def _export(model, x, path, mode):
    pytest.importorskip(
        'onnx',
        reason='ONNX export needs the [deploy] extra: pip install onnx')
    pytest.importorskip(
        'onnxruntime',
        reason='the ONNX check needs the [deploy] extra: pip install '
        'onnxruntime')
    from gmpq_mm.apis.onnx_export import export_onnx_model
    from gmpq_mm.deploy.ort_check import run_onnxruntime
    summary = export_onnx_model(
        model, str(path), (1, 28, 28), mode=mode, inputs=x, verify=False)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    return summary, ref, run_onnxruntime(str(path), x)


def _no_emulation(model):
    plain = copy.deepcopy(model)
    blocks = [m for m in plain.modules() if hasattr(m, 'emulate_int_bias')]
    assert len(blocks) == 8
    for block in blocks:
        block.emulate_int_bias = False
    return plain


def test_integer_export_reproduces_the_model(trained_w2a2, tmp_path):
    model, x = trained_w2a2
    summary, ref, got = _export(model, x, tmp_path / 'int.onnx', 'integer')
    assert summary['model_points'] == 20
    assert summary['added_points'] == []
    assert summary['onnxruntime']['fallback'] == []
    assert summary['onnxruntime']['integer_convs'] == 19
    rel = _rel_l2(got, ref)
    top1 = float((got.argmax(1) == ref.argmax(1)).mean())
    assert top1 == 1.0, top1
    assert rel < 1e-3, rel
    # contrast: the same network evaluated without the int32-bias
    # emulation is not what the integer file computes
    plain = _no_emulation(model)
    _, plain_ref, plain_got = _export(plain, x, tmp_path / 'plain.onnx',
                                      'integer')
    plain_rel = _rel_l2(plain_got, plain_ref)
    print(f'integer graph vs PyTorch, relative L2 of the logits: '
          f'{rel:.3g} with the int32-bias emulation, {plain_rel:.3g} '
          'without it')
    assert plain_rel > 1e-3
    assert plain_rel > 100 * max(rel, 1e-9), (rel, plain_rel)


def test_float_qdq_export_reproduces_the_model(trained_w2a2, tmp_path):
    model, x = trained_w2a2
    summary, ref, got = _export(model, x, tmp_path / 'fq.onnx', 'float-qdq')
    assert summary['model_points'] == 20
    assert _rel_l2(got, ref) < 1e-5
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_float_qdq_export_without_emulation(trained_w2a2, tmp_path):
    model, x = trained_w2a2
    _, ref, got = _export(
        _no_emulation(model), x, tmp_path / 'fq_plain.onnx', 'float-qdq')
    assert _rel_l2(got, ref) < 1e-5


# ---------------------------------------------------------------------------
# load_model
# ---------------------------------------------------------------------------
def _config(requant_points):
    return dict(
        default_scope='mmpretrain',
        model=dict(
            type='ImageClassifier',
            backbone=dict(
                type='QuantizedBackbone',
                backbone=R18_TINY,
                w_bits=2,
                a_bits=2,
                requant_points=requant_points),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(
                type='LinearClsHead',
                num_classes=10,
                in_channels=64,
                loss=dict(type='CrossEntropyLoss', loss_weight=1.0))))


@pytest.mark.parametrize('saved, config', [(True, False), (False, True)])
def test_load_model_names_requant_points(tmp_path, saved, config):
    from gmpq_mm.apis.deploy import load_model
    init_default_scope('mmpretrain')
    model = MODELS.build(_config(saved)['model'])
    path = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': model.state_dict()}, path)
    with pytest.raises(RuntimeError, match='requant_points') as info:
        load_model(_config(config), str(path))
    assert 'point_range' in str(info.value)
    assert str(path) in str(info.value)
    # the matching config loads it
    loaded, _ = load_model(_config(saved), str(path))
    assert len(_points(loaded)) == (20 if saved else 0)


def test_bias_shift_follows_the_weights(trained_w2a2):
    """The eval-mode shift is cached per eval() call, and recomputed when a
    weight changes in place (an optimizer step) or eval() is called."""
    model = copy.deepcopy(trained_w2a2[0]).eval()
    block = next(m for m in model.modules()
                 if isinstance(m, RequantBasicBlock))
    first = block._shift(block.conv1, block.norm1).clone()
    assert block._shift(block.conv1,
                        block.norm1) is block._shift(block.conv1,
                                                     block.norm1)  # cached
    with torch.no_grad():
        block.norm1.running_mean += 0.37  # moves the bias off its units
    moved = block._shift(block.conv1, block.norm1)
    assert not torch.equal(moved, first)
    assert torch.allclose(moved, folded_bias_shift(block.conv1, block.norm1))
    block.norm1.running_mean.data -= 0.37  # invisible to the version...
    model.eval()  # ... but eval() starts afresh
    assert torch.allclose(
        block._shift(block.conv1, block.norm1), first, atol=1e-6)
