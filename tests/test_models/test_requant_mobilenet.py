"""MobileNetV2 with requantization points: where they go, and an integer
ONNX file that computes the PyTorch network."""
import copy

import numpy as np
import pytest
import torch
from mmengine.registry import init_default_scope
from torch import nn

from gmpq_mm.models.utils.requant_mobilenet import (RequantConvModule,
                                                    RequantInvertedResidual)
from gmpq_mm.quantization.requant_point import RequantPoint
from gmpq_mm.registry import MODELS
from gmpq_mm.utils import register_all_modules

register_all_modules()
init_default_scope('mmpretrain')


def _mbv2(requant_points=True):
    torch.manual_seed(0)
    return MODELS.build(
        dict(
            type='QuantizedBackbone',
            backbone=dict(type='MobileNetV2', widen_factor=0.25),
            w_bits=4,
            a_bits=4,
            requant_points=requant_points))


def test_points_where_the_integer_graph_needs_them():
    """A residual block: a point on its branch; any block followed by a
    residual block: a point on its output (it also feeds that add); the
    first block, residual at width 0.25 (8 channels in and out): a point
    on its shortcut (the stem's output, uint8); the last ConvModule
    (conv2, ReLU6, read by the pooling): a uint8 point. MobileNetV2 x 0.25
    has 17 blocks, 11 residual, 10 of them after a block: 11 + 10 + 1 + 1
    = 23 points."""
    net = _mbv2()
    blocks = [(n, m) for n, m in net.named_modules()
              if isinstance(m, RequantInvertedResidual)]
    assert len(blocks) == 17
    assert sum(b.use_res_connect for _, b in blocks) == 11
    assert blocks[0][1].use_res_connect
    for i, (name, block) in enumerate(blocks):
        assert (block.requant_branch is not None) == block.use_res_connect
        follows = i + 1 < len(blocks) and blocks[i + 1][1].use_res_connect
        assert (block.requant_out is not None) == follows, name
        assert (block.requant_identity is not None) == (i == 0), name
    points = {
        n: m
        for n, m in net.named_modules() if isinstance(m, RequantPoint)
    }
    assert len(points) == 23
    unsigned = {'conv2.requant_out', 'layer1.0.requant_identity'}
    assert all(p.signed != (n in unsigned) for n, p in points.items())
    convs = [m for m in net.modules() if isinstance(m, RequantConvModule)]
    assert len(convs) == 51  # every quantized conv (all but the stem)
    assert type(net.conv1).__name__ == 'ConvModule'  # the FP stem as is


class _Classifier(nn.Module):

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(1280, 10)

    def forward(self, x, mode='tensor'):
        return self.fc(self.backbone(x)[-1].mean((2, 3)))


def _trained(requant_points):
    from gmpq_mm.quantization import calibrate_model
    model = _Classifier(_mbv2(requant_points))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 3, 32, 32, generator=gen) for _ in range(4)]
    calibrate_model(model, batches[:1], method='max')
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    model.eval()
    return model, torch.randn(64, 3, 32, 32, generator=gen).numpy()


@pytest.mark.parametrize('requant_points', [True, False])
def test_integer_export_computes_the_network(tmp_path, requant_points):
    """With the points the integer file is the PyTorch function (all 23
    points the model's, none added); without them the export adds the
    same number of its own and the function differs."""
    pytest.importorskip('onnx', reason='pip install onnx')
    pytest.importorskip('onnxruntime', reason='pip install onnxruntime')
    from gmpq_mm.apis.onnx_export import export_onnx_model
    from gmpq_mm.deploy.ort_check import run_onnxruntime
    model, x = _trained(requant_points)
    path = str(tmp_path / 'mbv2.onnx')
    summary = export_onnx_model(
        model, path, (3, 32, 32), mode='integer', inputs=x, verify=False)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = run_onnxruntime(path, x)
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    print(f'requant_points={requant_points}: relative L2 {rel:.3g}')
    # onnxruntime fuses a conv / add only when its quantized input and
    # output share one type: every activation, signed grids included (in
    # uint8 around 128), is uint8, so all 51 convs and the 11 residual adds
    # run on integer kernels (before: 37 and 0 with int8 signed grids)
    ops = summary['onnxruntime']['ops']
    assert summary['onnxruntime']['integer_convs'] == 51
    assert ops.get('QLinearAdd') == 11 and 'Add' not in ops
    assert ops.get('Conv') == 1  # the FP stem
    import onnx

    from gmpq_mm.deploy.onnx_graph import constants
    graph = onnx.load(path).graph
    consts = constants(graph)
    zeros = [
        consts[n.input[2]] for n in graph.node
        if n.op_type == 'QuantizeLinear' and len(n.input) > 2
    ]
    assert zeros and all(z.dtype == np.uint8 for z in zeros)
    assert any(int(z) == 128 for z in zeros)  # the signed grids
    if requant_points:
        assert summary['model_points'] == 23
        assert summary['added_points'] == []
        assert rel < 1e-4
        assert (got.argmax(1) == ref.argmax(1)).all()
    else:
        assert summary['model_points'] == 0
        assert len(summary['added_points']) == 23
        assert rel > 1e-2


def test_baked_bias_is_the_eval_function():
    model, x = _trained(True)
    x = torch.from_numpy(x[:8])
    baked = copy.deepcopy(model)
    for m in baked.modules():
        if hasattr(m, 'bake_folded_bias'):
            m.bake_folded_bias()
    with torch.no_grad():
        assert torch.allclose(baked(x), model(x), atol=1e-5)
