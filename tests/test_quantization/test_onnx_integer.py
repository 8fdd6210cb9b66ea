"""The integer QDQ graph: BatchNorm folded by hand, outputs requantized onto
the next layer's grid, and what onnxruntime's optimized graph runs."""
import numpy as np
import pytest
import torch
from torch import nn

from gmpq_mm.deploy.onnx_graph import constants
from gmpq_mm.deploy.ort_check import optimized_nodes, run_onnxruntime
from gmpq_mm.quantization.convert import to_quantized

onnx = pytest.importorskip(
    'onnx', reason='ONNX export needs the [deploy] extra: pip install onnx')
pytest.importorskip(
    'onnxruntime',
    reason='the ONNX check needs the [deploy] extra: pip install onnxruntime')


class _Block(nn.Module):
    """FP stem, then a residual block of two quantized convs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(x + y).mean((2, 3))


class _Logits(nn.Module):
    """``export_onnx_model`` calls ``model(x, mode='tensor')``."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, mode='tensor'):
        return self.net(x)


def _block(bits):
    torch.manual_seed(0)
    net = _Block()
    with torch.no_grad():
        for bn in (net.bn0, net.bn1, net.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
        net.bn2.weight[1] = -0.7  # a negative BatchNorm factor
    to_quantized(net, {'conv1': bits, 'conv2': bits}, per_channel=True)
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = torch.relu(net.bn0(net.stem(x)))
        net.conv1.calibrate_activation(float(h.max()) * 0.8)
        h2 = torch.relu(net.bn1(net.conv1(h)))
        net.conv2.calibrate_activation(float(h2.max()) * 0.8)
    return _Logits(net.eval()), x.numpy()


def _export(tmp_path, bits, mode='integer'):
    from gmpq_mm.apis.onnx_export import export_onnx_model
    model, x = _block(bits)
    path = tmp_path / f'{mode}.onnx'
    summary = export_onnx_model(
        model, str(path), (3, 8, 8), mode=mode, inputs=x)
    return model, x, path, summary


def test_batchnorm_folded_by_hand(tmp_path):
    """conv2's folded weight scale is s_w * |gamma / sqrt(var + eps)| / m,
    its codes are the 4-bit codes times m = 127 // 7 = 18 (the largest
    multiple int8 holds; 2 * 7 * 7 * 18 is far inside int16), negated where
    that factor is negative, its int32 bias is round(shift / (s_x * s_w')),
    with shift = beta - mean * factor."""
    model, _, path, summary = _export(tmp_path, (4, 3))
    net = model.net
    proto = onnx.load(str(path))
    consts = constants(proto.graph)
    producer = {o: n for n in proto.graph.node for o in n.output}
    conv = [n for n in proto.graph.node if n.name == 'net.conv2'][0]
    dq_x, dq_w, dq_b = (producer[i] for i in conv.input)
    from gmpq_mm.quantization.export import weight_codes
    codes, t = weight_codes(net.conv2)
    bn = net.bn2
    g = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    s_w = t.double() / 7  # 4-bit weights: n = 7
    s_x = np.float32(net.conv2.act_range.item() / 7)  # 3-bit input: n = 7
    got_codes = consts[dq_w.input[0]].astype(np.int64)
    sign = np.sign(g.numpy()).reshape(-1, 1, 1, 1).astype(np.int64)
    m = 18
    np.testing.assert_array_equal(got_codes, codes.numpy() * sign * m)
    assert len(np.unique(got_codes)) <= 15  # still the 4-bit grid
    np.testing.assert_allclose(
        consts[dq_w.input[1]], (s_w * g.abs()).numpy() / m, rtol=1e-6)
    assert consts[dq_x.input[1]] == s_x
    shift = (bn.bias.double() - bn.running_mean.double() * g).detach()
    want = np.rint(
        shift.numpy() /
        (np.float64(s_x) * consts[dq_w.input[1]].astype(np.float64)))
    np.testing.assert_array_equal(consts[dq_b.input[0]], want)
    assert consts[dq_b.input[0]].dtype == np.int32
    # conv1's output goes onto conv2's 3-bit grid: uint8 codes, integer
    # Clip to [0, 7], no ReLU left between them
    clip = producer[dq_x.input[0]]
    assert clip.op_type == 'Clip'
    assert consts[clip.input[2]] == 7 and consts[clip.input[2]].dtype == \
        np.uint8
    q = producer[clip.input[0]]
    assert q.op_type == 'QuantizeLinear'
    assert producer[q.input[0]].name == 'net.conv1'
    assert summary['integer_layers'] == ['net.conv1', 'net.conv2']


@pytest.mark.parametrize('bits', [(8, 8), (4, 3)])
def test_onnxruntime_runs_integer_kernels(tmp_path, bits):
    model, x, path, summary = _export(tmp_path, bits)
    ops = [op for op, _ in optimized_nodes(str(path))]
    assert ops.count('QLinearConv') == 2, ops
    assert ops.count('QLinearAdd') == 1, ops
    assert ops.count('Conv') == 1  # the FP stem
    assert summary['onnxruntime']['fallback'] == []
    # the 8-bit points: the residual branch (conv2 + BatchNorm), the
    # identity (the stem's ReLU) and the sum after its ReLU
    assert len(summary['added_points']) == 3
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = run_onnxruntime(str(path), x)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    # float-qdq reproduces PyTorch; the integer graph is close
    assert summary['verify']['rel_l2'] == pytest.approx(rel, rel=1e-3)
    assert rel < 0.05, rel
    _, _, fq_path, fq = _export(tmp_path, bits, mode='float-qdq')
    fq_ops = [op for op, _ in optimized_nodes(str(fq_path))]
    assert 'QLinearConv' not in fq_ops and fq_ops.count('Conv') == 3
    assert fq['verify']['rel_l2'] < 1e-5


def test_wrong_codes_are_refused(tmp_path):
    from gmpq_mm.deploy.onnx_integer import check_integer_model
    from gmpq_mm.deploy.qdq_modules import qdq_layer_info, qdq_module
    _, _, path, summary = _export(tmp_path, (4, 3))
    model, _ = _block((4, 3))
    layers = qdq_layer_info(qdq_module(model))
    proto = onnx.load(str(path))
    check_integer_model(proto, layers, ['net.conv1', 'net.conv2'])
    conv = [n for n in proto.graph.node if n.name == 'net.conv1'][0]
    dq_w = [n for n in proto.graph.node if n.output[0] == conv.input[1]][0]
    for i, t in enumerate(proto.graph.initializer):
        if t.name == dq_w.input[0]:
            codes = onnx.numpy_helper.to_array(t).copy()
            codes.reshape(-1)[0] = 8  # outside the 4-bit [-7, 7]
            proto.graph.initializer[i].CopyFrom(
                onnx.numpy_helper.from_array(codes, t.name))
    with pytest.raises(RuntimeError, match='net.conv1: int8 weight codes'):
        check_integer_model(proto, layers, ['net.conv1', 'net.conv2'])


def test_onnx_honours_umask_and_removes_leftovers(tmp_path):
    """The .onnx file is 0644 under umask 022, and the hidden temporary a
    killed export left beside it is gone after the next export there."""
    import os
    import stat

    from gmpq_mm.apis.onnx_export import export_onnx_model
    pid = 4_000_000
    while True:  # a pid no process has: the killed exporter's
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        except PermissionError:
            pass
        pid += 1
    stale = tmp_path / f'.m.onnx.{pid}.k1ll3d.tmp'
    stale.write_bytes(b'\0' * 4096)
    model, x = _block((4, 3))
    old = os.umask(0o022)
    try:
        export_onnx_model(
            model,
            str(tmp_path / 'm.onnx'), (3, 8, 8),
            mode='float-qdq',
            verify=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / 'm.onnx').stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m.onnx']
