"""QDQ ONNX export of fixed-bit layers: hand-computed grids, graph checks,
onnxruntime against PyTorch."""
import numpy as np
import pytest
import torch
from torch import nn

from gmpq_mm.compat import export_onnx
from gmpq_mm.deploy.onnx_graph import (ONNX_OPSET, check_qdq_model,
                                       finalize_qdq_model)
from gmpq_mm.deploy.ort_check import run_onnxruntime
from gmpq_mm.deploy.qdq_modules import qdq_layer_info, qdq_module
from gmpq_mm.quantization.convert import to_mixed_precision, to_quantized
from gmpq_mm.quantization.layers import is_quantized_layer

onnx = pytest.importorskip(
    'onnx', reason='ONNX export needs the [deploy] extra: pip install onnx')
ort = pytest.importorskip(
    'onnxruntime',
    reason='the ONNX check needs the [deploy] extra: pip install onnxruntime')
helper = onnx.helper
numpy_helper = onnx.numpy_helper


def _export(net, shape, path):
    """Export ``net`` as QDQ ONNX at ``path``; returns (proto, layers)."""
    exported = qdq_module(net)
    layers = qdq_layer_info(exported)
    export_onnx(
        exported, (torch.zeros((2, ) + tuple(shape)), ),
        str(path),
        opset_version=ONNX_OPSET,
        input_names=['input'],
        output_names=['out'],
        dynamic_axes={
            'input': {
                0: 'batch'
            },
            'out': {
                0: 'batch'
            }
        })
    proto = finalize_qdq_model(onnx.load(str(path)), layers)
    onnx.save(proto, str(path))
    return proto, layers


def _consts(proto):
    values = {
        t.name: numpy_helper.to_array(t)
        for t in proto.graph.initializer
    }
    for node in proto.graph.node:
        if node.op_type == 'Constant':
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


class _OneConv(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize('signed', [False, True])
def test_grid_by_hand(tmp_path, signed):
    net = _OneConv()
    with torch.no_grad():
        net.conv.weight.copy_(torch.tensor([0.3, -0.9]).view(2, 1, 1, 1))
    # w: 3 bits, n = 3, T = max|W| = 0.9, scale 0.3: codes 1 and -3.
    # a: 2 bits unsigned (n = 3) or 3 bits signed (n = 3), r = 1.5: s = 0.5.
    to_quantized(
        net, {'conv': (3, 3 if signed else 2)}, signed={'conv': signed})
    net.conv.calibrate_activation(1.5)
    net.eval()
    proto, layers = _export(net, (1, 1, 6), tmp_path / 'one.onnx')
    summary = check_qdq_model(proto, layers)
    assert summary['quantize_linear'] == 1
    assert summary['dequantize_linear'] == 2
    consts = _consts(proto)
    codes = consts['conv.weight_quantized']
    assert codes.dtype == np.int8
    assert codes.reshape(-1).tolist() == [1, -3]
    nodes = {n.op_type: n for n in proto.graph.node}
    clip, q = nodes['Clip'], nodes['QuantizeLinear']
    lo = -1.5 if signed else 0.0
    assert float(consts[clip.input[1]]) == lo
    assert float(consts[clip.input[2]]) == 1.5
    assert float(consts[q.input[1]]) == 0.5
    assert consts[q.input[2]].dtype == np.int8 and consts[q.input[2]] == 0
    dq_w = [
        n for n in proto.graph.node if n.op_type == 'DequantizeLinear'
        and n.input[0] == 'conv.weight_quantized'
    ][0]
    assert np.isclose(float(consts[dq_w.input[1]]), 0.3, rtol=1e-7)

    x = np.array([-1.0, 0.2, 0.26, 0.74, 0.76, 2.0], np.float32)
    # clamp to [lo, 1.5], / 0.5, round half to even, * 0.5
    if signed:
        xq = np.array([-1.0, 0.0, 0.5, 0.5, 1.0, 1.5], np.float32)
    else:
        xq = np.array([0.0, 0.0, 0.5, 0.5, 1.0, 1.5], np.float32)
    got = run_onnxruntime(str(tmp_path / 'one.onnx'), x.reshape(1, 1, 1, 6))
    want = np.stack([xq * 0.3, xq * -0.9]).reshape(1, 2, 1, 6)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        ref = net(torch.from_numpy(x).view(1, 1, 1, 6)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


class _Net(nn.Module):

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b = nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=2)
        self.c = nn.Conv2d(6, 5, 1)
        self.d = nn.Conv2d(5, 7, 3, padding=1)
        self.g = nn.Conv2d(5, 7, 1)
        self.e = nn.Conv2d(7, 7, 3, padding=1)
        self.fc = nn.Linear(7, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.a(x))
        x = self.b(x)  # signed input for c
        x = torch.relu(self.c(x))
        # d and g read the same tensor with the same range: the exporter
        # shares one Clip -> Q -> DQ between them
        x = torch.relu(self.d(x)) + self.g(x)
        x = torch.relu(self.e(x))
        return self.fc(x.mean((2, 3)))


POLICY = {
    'a': (2, 3),
    'b': (3, 4),
    'c': (6, 2),
    'd': (32, 8),
    'g': (4, 8),
    'e': (4, 32),
    'fc': (8, 6)
}


def _quantized_net():
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.1, 0.1)
        net.bn.running_var.uniform_(0.5, 1.5)
    to_quantized(net, POLICY, signed={'c': True}, per_channel=False)
    # calibrated thresholds: one clipping per tensor, one per channel, one
    # per-channel max|W| layer; the others max|W| of the tensor
    net.a.calibrate_weight(float(net.a.weight.detach().abs().max()) * 0.6)
    net.b.calibrate_weight(net.b.weight.detach().flatten(1).abs().amax(1) *
                           0.8)
    net.e.per_channel = True
    for name, m in net.named_modules():
        if is_quantized_layer(m):
            m.calibrate_activation({'c': 0.9, 'fc': 0.3}.get(name, 1.7))
    return net.eval()


def test_mixed_network_matches_pytorch(tmp_path):
    net = _quantized_net()
    path = tmp_path / 'net.onnx'
    proto, layers = _export(net, (3, 12, 12), path)
    summary = check_qdq_model(proto, layers)
    # every quantized input has Clip -> Q -> DQ (d and g share one; e has
    # a_bits 32), every quantized weight a DQ (all but d)
    assert summary['quantize_linear'] == 5
    assert summary['dequantize_linear'] == 5 + 6
    assert summary['opset'] == ONNX_OPSET
    assert all(n.domain in ('', 'ai.onnx') for n in proto.graph.node)
    for name, (w_bits, _) in POLICY.items():
        row = summary['layers'][name]
        if w_bits == 32:
            assert 'distinct_weights' not in row
            continue
        assert row['max_distinct_per_scale'] <= 2**w_bits - 1
    # the weight grid: per channel for b and e, one scale elsewhere
    assert summary['layers']['a']['distinct_weights'] <= 3
    assert summary['layers']['b']['distinct_weights'] > 7
    init = {t.name for t in proto.graph.initializer}
    assert 'd.weight' in init and 'a.weight' not in init  # d is FP
    # 8-bit unsigned activations need the uint8 container, the rest int8
    q_zero = [
        _consts(proto)[n.input[2]].dtype for n in proto.graph.node
        if n.op_type == 'QuantizeLinear'
    ]
    assert sorted(str(d) for d in q_zero) == ['int8'] * 4 + ['uint8']

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 12, 12, generator=gen)  # batch 5: dynamic batch
    with torch.no_grad():
        ref = net(x).numpy()
    for optimize in (True, False):
        got = run_onnxruntime(str(path), x.numpy(), optimize=optimize)
        assert got.shape == (5, 4)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_check_refuses_custom_domains_and_wide_grids(tmp_path):
    net = _quantized_net()
    proto, layers = _export(net, (3, 8, 8), tmp_path / 'net.onnx')
    bad = onnx.ModelProto()
    bad.CopyFrom(proto)
    bad.graph.node.append(
        helper.make_node('MyOp', ['input'], ['extra'], domain='com.example'))
    bad.opset_import.append(helper.make_opsetid('com.example', 1))
    with pytest.raises(RuntimeError, match='custom op domains'):
        check_qdq_model(bad, layers)
    # a 2-bit layer (codes in [-1, 1]) given a code of 2
    wide = onnx.ModelProto()
    wide.CopyFrom(proto)
    for i, t in enumerate(wide.graph.initializer):
        if t.name == 'a.weight_quantized':
            codes = numpy_helper.to_array(t).copy()
            codes.reshape(-1)[0] = 2
            wide.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(codes, t.name))
    with pytest.raises(
            RuntimeError, match=r'a: weight code 2 outside the \[-1, 1\]'):
        check_qdq_model(wide, layers)
    # an activation range that is not the layer's
    moved = onnx.ModelProto()
    moved.CopyFrom(proto)
    clip = [n for n in moved.graph.node if n.op_type == 'Clip'][0]
    for node in moved.graph.node:
        if node.output[0] == clip.input[2]:
            node.attribute[0].t.CopyFrom(
                numpy_helper.from_array(np.array(2.5, np.float32)))
    with pytest.raises(RuntimeError, match="differ from the layer's range"):
        check_qdq_model(moved, layers)


def test_refuses_search_and_fp_networks():
    fp = _Net().eval()
    with pytest.raises(ValueError, match='no quantized layer'):
        qdq_module(fp)
    mixed = _Net()
    to_mixed_precision(mixed, (2, 4), (2, 4), names=['a', 'c'])
    with pytest.raises(ValueError, match='searchable'):
        qdq_module(mixed)
