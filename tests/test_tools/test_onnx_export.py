"""tools/deploy/export.py --out x.onnx on the demo network: onnxruntime on
the shipped Fashion-MNIST test images against PyTorch, the QDQ graph, and
bad input.

The network is the slim ResNet-18 of configs/gmpq/demo with a mixed policy
(2, 3, 4 and 6 bits for weights and activations, one FP-weight layer, one
FP-input layer): randomly initialised (seed 0), ranges calibrated on 64
training images, and only the classifier fitted (ridge regression on the
quantized features of 1000 training images), so that its top-1 is far from
chance in a few seconds of CPU.
"""
import importlib.util
import json
import os
import os.path as osp

import numpy as np
import pytest
import torch

onnx = pytest.importorskip(
    'onnx', reason='ONNX export needs the [deploy] extra: pip install onnx')
pytest.importorskip(
    'onnxruntime',
    reason='the ONNX check needs the [deploy] extra: pip install onnxruntime')

from onnx import numpy_helper  # noqa: E402

from gmpq_mm.deploy.ort_check import run_onnxruntime  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(REPO, 'configs/gmpq/demo/finetune_r18_fashion_mnist.py')
DATA = osp.join(REPO, 'data_demo/fashion_mnist_subset')
MEAN, STD = 72.94, 90.0  # configs/gmpq/_base_/datasets/fashion_mnist_demo.py


def _idx(name):
    """An IDX file of the shipped subset as a numpy array."""
    with open(osp.join(DATA, name), 'rb') as f:
        raw = f.read()
    ndim = raw[3]
    dims = [
        int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)
    ]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _images(split):
    x = _idx(f'{split}-images-idx3-ubyte').astype(np.float32)[:, None]
    y = _idx(f'{split}-labels-idx1-ubyte').astype(np.int64)
    return ((x - MEAN) / STD).astype(np.float32), y


def _tool():
    return _load_tool('tools/deploy/export.py', 'export_tool')


def _mixed_policy():
    names = [
        'layer1.0.conv1', 'layer1.0.conv2', 'layer1.1.conv1', 'layer1.1.conv2',
        'layer2.0.conv1', 'layer2.0.conv2', 'layer2.0.downsample.0',
        'layer2.1.conv1', 'layer2.1.conv2', 'layer3.0.conv1', 'layer3.0.conv2',
        'layer3.0.downsample.0', 'layer3.1.conv1', 'layer3.1.conv2',
        'layer4.0.conv1', 'layer4.0.conv2', 'layer4.0.downsample.0',
        'layer4.1.conv1', 'layer4.1.conv2'
    ]
    cycle = (2, 3, 4, 6)
    layers = {
        n: {
            'w_bits': cycle[i % 4],
            'a_bits': cycle[(i + 1) % 4]
        }
        for i, n in enumerate(names)
    }
    layers['layer4.1.conv1'] = {'w_bits': 32, 'a_bits': 6}
    layers['layer4.1.conv2'] = {'w_bits': 6, 'a_bits': 32}
    return {'format': 'gmpq-policy', 'version': 1, 'layers': layers}


def _options(policy_file):
    return [
        '--cfg-options', f'model.backbone.policy={policy_file}',
        'load_from=None'
    ]


def _run(argv):
    """The tool in-process; its error message if it stops."""
    try:
        return _tool().main(argv)
    except SystemExit as err:
        return str(err)


def _demo(root, policy):
    from mmengine.config import Config

    from gmpq_mm.apis import load_model
    from gmpq_mm.quantization.calibration import calibrate_model

    policy_file = root / 'policy.json'
    policy_file.write_text(json.dumps(policy))
    cfg = Config.fromfile(CONFIG)
    cfg.merge_from_dict({
        'model.backbone.policy': str(policy_file),
        'load_from': None
    })
    torch.manual_seed(0)
    model, _ = load_model(cfg)
    x_train, y_train = _images('train')
    with torch.no_grad():
        calibrate_model(
            model.backbone, [torch.from_numpy(x_train[:64])],
            forward=lambda m, b: m(b),
            method='max')
        feats = model.backbone(torch.from_numpy(x_train[:1000]))[-1]
        feats = torch.cat([
            model.neck(feats) if model.with_neck else feats.mean((2, 3)),
            torch.ones(1000, 1)
        ], 1)
        target = torch.nn.functional.one_hot(
            torch.from_numpy(y_train[:1000]), 10).float()
        sol = torch.linalg.solve(
            feats.T @ feats + 1e-2 * torch.eye(feats.shape[1]),
            feats.T @ target)
        model.head.fc.weight.copy_(sol[:-1].T)
        model.head.fc.bias.copy_(sol[-1])
    ckpt = root / 'mixed.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, ckpt)
    return dict(root=root, policy=policy_file, ckpt=ckpt, model=model, cfg=cfg)


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    """The mixed 2/3/4/6-bit network (its float-QDQ graph is exact)."""
    return _demo(tmp_path_factory.mktemp('onnx_demo'), _mixed_policy())


@pytest.fixture(scope='module')
def demo8(tmp_path_factory):
    """The same recipe at W8A8. With random conv weights the 2-3-bit
    network is chaotic (an 8-bit rounding of one residual branch changes a
    third of its predictions, in PyTorch as in onnxruntime), so the integer
    graph's accuracy is checked on this one; the finetuned demo network is
    measured in docs/user_guides/export.md."""
    policy = _mixed_policy()
    for name in policy['layers']:
        policy['layers'][name] = {'w_bits': 8, 'a_bits': 8}
    return _demo(tmp_path_factory.mktemp('onnx_demo8'), policy)


def test_onnx_matches_pytorch_on_test_images(demo):
    root, out = demo['root'], demo['root'] / 'mixed.onnx'
    summary = _run([
        CONFIG,
        str(demo['ckpt']), '--out',
        str(out), '--onnx-mode', 'float-qdq', '--json',
        str(root / 'summary.json')
    ] + _options(demo['policy']))
    assert isinstance(summary, dict), summary
    assert out.is_file() and summary['bytes'] == out.stat().st_size
    assert summary['verify']['top1_agreement'] >= 0.95
    assert json.loads((root / 'summary.json').read_text())['path'] == str(out)
    # no temporary file left next to it
    assert sorted(p.name for p in root.iterdir() if p.name.startswith('.')) \
        == []

    x_test, y_test = _images('t10k')
    with torch.no_grad():
        ref = torch.cat([
            demo['model'](torch.from_numpy(x_test[i:i + 250]), mode='tensor')
            for i in range(0, len(x_test), 250)
        ]).numpy()
    got = run_onnxruntime(str(out), x_test)  # batch 1000: dynamic batch
    acc_torch = float((ref.argmax(1) == y_test).mean())
    acc_onnx = float((got.argmax(1) == y_test).mean())
    print(f'top-1 PyTorch {acc_torch:.4f}, onnxruntime {acc_onnx:.4f}, '
          f'{int((ref.argmax(1) != got.argmax(1)).sum())} of {len(y_test)} '
          f'predictions differ')
    assert acc_torch > 0.4  # far from chance (0.1): a meaningful check
    assert abs(acc_onnx - acc_torch) <= 0.001 + 1e-9  # within 0.1 points


def test_onnx_graph_is_standard_qdq(demo):
    out = demo['root'] / 'mixed.onnx'
    if not out.is_file():
        _run([
            CONFIG,
            str(demo['ckpt']), '--out',
            str(out), '--onnx-mode', 'float-qdq'
        ] + _options(demo['policy']))
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    graph = proto.graph
    assert {n.domain for n in graph.node} <= {'', 'ai.onnx'}
    assert {o.domain for o in proto.opset_import} <= {'', 'ai.onnx'}
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param
    ops = [n.op_type for n in graph.node]
    layers = _mixed_policy()['layers']
    n_act = sum(v['a_bits'] != 32 for v in layers.values())
    n_w = sum(v['w_bits'] != 32 for v in layers.values())
    assert ops.count('QuantizeLinear') == n_act
    assert ops.count('DequantizeLinear') == n_act + n_w
    assert ops.count('Clip') >= n_act
    meta = {p.key: p.value for p in proto.metadata_props}
    stored = json.loads(meta['policy'])['layers']
    assert {k: (v['w_bits'], v['a_bits']) for k, v in stored.items()} == \
        {k: (v['w_bits'], v['a_bits']) for k, v in layers.items()}

    # every int8 weight, dequantized as onnxruntime does, is on its grid
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts = dict(inits)
    for node in graph.node:
        if node.op_type == 'Constant':
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    seen = set()
    for node in graph.node:
        if node.op_type != 'DequantizeLinear' or node.input[0] not in inits:
            continue
        name = node.input[0]
        layer = name[len('model.backbone.'):-len('.weight_quantized')]
        bits = layers[layer]['w_bits']
        codes, scale = inits[name], consts[node.input[1]]
        assert codes.dtype == np.int8
        values = codes.astype(np.float32) * scale.reshape(
            (-1, ) + (1, ) * (codes.ndim - 1) if scale.size > 1 else ())
        assert len(np.unique(values)) <= 2**bits, layer
        assert np.abs(codes.astype(int)).max() <= 2**(bits - 1) - 1, layer
        seen.add(layer)
    assert seen == {k for k, v in layers.items() if v['w_bits'] != 32}
    # a 32-bit weight stays a float initializer
    floats = [
        n for n, v in inits.items() if v.dtype == np.float32 and v.ndim == 4
    ]
    assert floats  # the stem and the FP-weight layer


def _fp_and_search_checkpoints(root):
    from gmpq_mm.apis import load_model
    from gmpq_mm.quantization.convert import to_mixed_precision
    pretrain = osp.join(REPO,
                        'configs/gmpq/demo/pretrain_r18_fashion_mnist.py')
    torch.manual_seed(0)
    fp, _ = load_model(pretrain)
    fp_ckpt = root / 'fp.pth'
    torch.save({'state_dict': fp.state_dict(), 'meta': {}}, fp_ckpt)
    to_mixed_precision(
        fp.backbone, (2, 3, 4, 6), (2, 3, 4, 6), input_shape=(1, 28, 28))
    search_ckpt = root / 'search.pth'
    torch.save({'state_dict': fp.state_dict(), 'meta': {}}, search_ckpt)
    return fp_ckpt, search_ckpt


def test_bad_checkpoints_stop_and_write_nothing(demo, tmp_path):
    fp_ckpt, search_ckpt = _fp_and_search_checkpoints(tmp_path)
    out = tmp_path / 'bad.onnx'
    for ckpt, what in ((search_ckpt, 'search (supernet) checkpoint'),
                       (fp_ckpt, 'full-precision checkpoint')):
        msg = _run(
            [CONFIG, str(ckpt), '--out', str(out)] + _options(demo['policy']))
        assert isinstance(msg, str) and msg.startswith('error: '), msg
        assert str(ckpt) in msg and what in msg, msg
        assert not out.exists()
        assert [
            p.name for p in tmp_path.iterdir() if p.suffix not in ('.pth', )
        ] == []


def test_policy_disagreeing_with_checkpoint(demo, tmp_path):
    record = pytest.importorskip(
        'gmpq_mm.utils.bit_record',
        reason='needs the per-layer bit record in checkpoints (issue 12)')
    ckpt = torch.load(demo['ckpt'], weights_only=False)
    record.record_bit_widths(ckpt, demo['model'])
    saved = tmp_path / 'recorded.pth'
    torch.save(ckpt, saved)
    other = _mixed_policy()
    other['layers']['layer1.0.conv1'] = {'w_bits': 4, 'a_bits': 4}
    other_file = tmp_path / 'other_policy.json'
    other_file.write_text(json.dumps(other))
    out = tmp_path / 'disagree.onnx'
    msg = _run([CONFIG, str(saved), '--out', str(out)] + _options(other_file))
    assert isinstance(msg, str) and str(saved) in msg, msg
    assert 'layer1.0.conv1' in msg
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith('.')]


@pytest.mark.parametrize('mode', ['float-qdq', 'integer'])
def test_wrong_graph_is_refused(demo, demo8, tmp_path, monkeypatch, mode):
    """A graph that computes something else (one weight scale 1.5x) fails
    the onnxruntime check: error, nothing written."""
    import gmpq_mm.apis.onnx_export as api
    net = demo if mode == 'float-qdq' else demo8

    finalize = api.finalize_qdq_model

    def broken(proto, layers):
        proto = finalize(proto, layers)
        consts = {
            n.output[0]: n
            for n in proto.graph.node if n.op_type == 'Constant'
        }
        dq = [
            n for n in proto.graph.node if n.op_type == 'DequantizeLinear'
            and n.input[0].endswith('layer1.0.conv1.weight_quantized')
        ][0]
        scale = consts[dq.input[1]].attribute[0].t
        value = numpy_helper.to_array(scale)
        value = (value * 1.5).astype(value.dtype)  # numpy 1.x: 0-d -> f64
        scale.CopyFrom(numpy_helper.from_array(value, scale.name))
        return proto

    monkeypatch.setattr(api, 'finalize_qdq_model', broken)
    out = tmp_path / 'wrong.onnx'
    msg = _run(
        [CONFIG,
         str(net['ckpt']), '--out',
         str(out), '--onnx-mode', mode] + _options(net['policy']))
    assert isinstance(msg, str) and 'does not reproduce' in msg, msg
    assert str(net['ckpt']) in msg and f'({mode} graph)' in msg
    assert os.listdir(tmp_path) == []


def _load_tool(path, name):
    spec = importlib.util.spec_from_file_location(name, osp.join(REPO, path))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_integer_onnx_on_test_images(demo8):
    """The default export: onnxruntime runs every quantized conv as
    QLinearConv; on the 1,000 shipped test images its top-1 agrees with
    PyTorch's (tools/deploy/test_onnx.py)."""
    root, out = demo8['root'], demo8['root'] / 'int.onnx'
    summary = _run([CONFIG, str(demo8['ckpt']), '--out',
                    str(out)] + _options(demo8['policy']))
    assert isinstance(summary, dict), summary
    assert summary['mode'] == 'integer'
    assert summary['calibration'] == '64 training images'
    ort = summary['onnxruntime']
    assert ort['integer_convs'] == 19 and ort['fallback'] == []
    assert ort['ops'].get('QLinearAdd') == 8  # one per residual block
    assert ort['ops'].get('Conv') == 1  # the FP stem
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta['onnx_mode'] == 'integer'
    tool = _load_tool('tools/deploy/test_onnx.py', 'test_onnx_tool')
    result = tool.main([
        CONFIG,
        str(out), '--checkpoint',
        str(demo8['ckpt']), '--json',
        str(root / 'acc.json')
    ] + _options(demo8['policy']))
    print(result)
    assert result['images'] == 1000
    assert result['torch_top1'] > 40  # far from chance (10)
    assert result['agreement'] >= 95
    assert abs(result['onnx_top1'] - result['torch_top1']) <= 1.5
    assert json.loads((root / 'acc.json').read_text())['differ'] == \
        result['differ']


def test_benchmark_onnx_times_three_models(demo8, tmp_path):
    """tools/analysis/benchmark_onnx.py on the demo network: the FP twin
    has no quantizer nodes and matches PyTorch's float network, the integer
    files run QLinearConv, the JSON is what it printed, each ratio is the
    median of its rounds."""
    tool = _load_tool('tools/analysis/benchmark_onnx.py', 'benchmark_onnx')
    work, out = tmp_path / 'bench', tmp_path / 'bench.json'
    results = tool.main([
        CONFIG,
        str(demo8['ckpt']), '--work-dir',
        str(work), '--batch-sizes', '1', '4', '--rounds', '3', '--iters', '2',
        '--threads', '1', '--json',
        str(out)
    ] + _options(demo8['policy']))
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]
    ops = {
        name: {n.op_type
               for n in onnx.load(str(work / name)).graph.node}
        for name in ('fp.onnx', 'int.onnx', 'w8a8.onnx')
    }
    assert 'QuantizeLinear' in ops['int.onnx']
    assert not ops['fp.onnx'] & {'QuantizeLinear', 'DequantizeLinear'}
    assert results['integer_convs'] == {'int': 19, 'w8a8': 19}
    assert results['bytes']['int'] < results['bytes']['fp']
    assert len(results['table']) == 2
    for row in results['table'].values():
        for key, (num, den) in (('int_vs_fp', ('fp', 'int')),
                                ('int_vs_w8a8', ('w8a8', 'int'))):
            ratios = [
                a / b
                for a, b in zip(row['rounds_ms'][num], row['rounds_ms'][den])
            ]
            assert len(ratios) == 3
            assert row[key]['median'] == pytest.approx(sorted(ratios)[1])
            assert row[key]['min'] == min(ratios) > 0
    # The FP twin is the float network: same logits as PyTorch's copy.
    model = tool.float_copy(demo8['model']).eval()
    x = _images('t10k')[0][:8]
    with torch.no_grad():
        ref = model(torch.from_numpy(x), mode='tensor')
    got = run_onnxruntime(str(work / 'fp.onnx'), x)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4)


def test_safetensors_export_refuses_a_wrong_rebuild(demo, tmp_path,
                                                    monkeypatch):
    """The artifact is kept only if the network rebuilt from it reproduces
    the checkpoint's logits: a rebuild that differs (one weight scaled) is
    an error, and nothing is left in the folder."""
    import gmpq_mm.apis.deploy as deploy
    rebuild = deploy.build_deployed_model

    def wrong(path, device='cpu'):
        model, meta = rebuild(path, device)
        with torch.no_grad():
            model.head.fc.weight.mul_(1.01)
        return model, meta

    out = tmp_path / 'm.safetensors'
    ok = _run([CONFIG, str(demo['ckpt']), '--out',
               str(out)] + _options(demo['policy']))
    assert isinstance(ok, dict) and ok['max_abs_diff'] == 0, ok
    out.unlink()
    monkeypatch.setattr(deploy, 'build_deployed_model', wrong)
    msg = _run([CONFIG, str(demo['ckpt']), '--out',
                str(out)] + _options(demo['policy']))
    assert isinstance(msg, str) and 'does not reproduce' in msg, msg
    assert str(demo['ckpt']) in msg and 'nothing written' in msg
    assert os.listdir(tmp_path) == []


def test_onnx_export_unpickles_the_checkpoint_once(demo, tmp_path,
                                                   monkeypatch):
    """The export checks the checkpoint and then loads it into the model:
    one unpickling serves both (a payload in a trusted file would run once,
    not twice)."""
    import gmpq_mm.engine.checkpoint_load as checkpoint_load
    reads = []
    load = checkpoint_load._load_untrusted

    def counted(filename, map_location):
        reads.append(filename)
        return load(filename, map_location)

    monkeypatch.setattr(checkpoint_load, '_load_untrusted', counted)
    # no read window left open by an earlier run in this process
    monkeypatch.setattr(checkpoint_load.ReadOnce, '_memo', None)
    monkeypatch.setattr(checkpoint_load.ReadOnce, '_owner_ref', None)
    summary = _run([
        CONFIG,
        str(demo['ckpt']), '--out',
        str(tmp_path / 'm.onnx'), '--onnx-mode', 'float-qdq'
    ] + _options(demo['policy']))
    assert isinstance(summary, dict), summary
    assert reads == [str(demo['ckpt'])]
