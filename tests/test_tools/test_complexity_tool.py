"""tools/analysis/complexity.py end to end, and gmpq_mm.utils.report.

The figures are checked against counts made by hand here (layer by layer
from the ResNet definitions), not against the code under test.
"""
import copy
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from torch import nn

from gmpq_mm.quantization.policy import make_policy, save_policy
from gmpq_mm.registry import MODELS
from gmpq_mm.utils import register_all_modules
from gmpq_mm.utils.report import infer_input_shape, model_complexity

register_all_modules()

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / 'tools' / 'analysis' / 'complexity.py'
R18 = 'configs/gmpq/pretrain_r18_cifar10.py'
R50 = 'configs/gmpq/pretrain_r50_cifar10.py'
DEMO = 'configs/gmpq/demo/pretrain_r18_fashion_mnist.py'
SEARCH = 'configs/gmpq/search_r18_cifar10.py'

init_default_scope('mmpretrain')


# ---------------------------------------------------------------------------
# Independent counts (CIFAR stems: 3x3 stride-1 stem conv, no max-pool)
# ---------------------------------------------------------------------------
def conv(cin, cout, k, hw):
    """MACs and weights of a bias-free k x k conv with an hw x hw output."""
    return cin * cout * k * k * hw * hw, cin * cout * k * k


R18_LAYERS = ([
    'layer1.0.conv1', 'layer1.0.conv2', 'layer1.1.conv1', 'layer1.1.conv2'
] + [
    f'layer{s}.{name}' for s in (2, 3, 4)
    for name in ('0.conv1', '0.conv2', '0.downsample.0', '1.conv1', '1.conv2')
])


def r18_cifar_searched(width=64, hw=32):
    """(MACs, weights) of the 19 searched convs of a CIFAR ResNet-18."""
    convs = [conv(width, width, 3, hw)] * 4
    for stage in (1, 2, 3):
        c, r = width * 2**stage, -(-hw // 2**stage)  # ceil
        convs += [conv(c // 2, c, 3, r)] + [conv(c, c, 3, r)] * 3
        convs += [conv(c // 2, c, 1, r)]  # downsample
    assert len(convs) == 19
    return sum(m for m, _ in convs), sum(w for _, w in convs)


def r50_cifar_macs(hw=32, num_classes=10):
    macs = conv(3, 64, 3, hw)[0]
    cin = 64
    for stage, blocks in enumerate((3, 4, 6, 3)):
        mid, r = 64 * 2**stage, hw // 2**stage
        for b in range(blocks):
            r_in = r * 2 if (b == 0 and stage > 0) else r
            macs += conv(cin, mid, 1, r_in)[0]  # conv1 at the input size
            macs += conv(mid, mid, 3, r)[0]  # conv2 (stride here)
            macs += conv(mid, 4 * mid, 1, r)[0]  # conv3
            if b == 0:
                macs += conv(cin, 4 * mid, 1, r)[0]  # downsample
            cin = 4 * mid
    return macs + 2048 * num_classes


R18_SEARCHED_MACS, R18_SEARCHED_WEIGHTS = r18_cifar_searched()
R18_TOTAL_MACS = R18_SEARCHED_MACS + conv(3, 64, 3, 32)[0] + 512 * 10
R50_TOTAL_MACS = r50_cifar_macs()


def test_hand_counts_match_the_spec():
    assert R18_SEARCHED_MACS == 553_648_128  # 553.6 MMACs, the released code's figure
    assert R18_TOTAL_MACS == 555_422_720


# ---------------------------------------------------------------------------
# The tool as a subprocess (the four runs go in parallel)
# ---------------------------------------------------------------------------
def _policy(path, names, bits=(4, 4)):
    save_policy(make_policy({n: bits for n in names}), path)
    return str(path)


def _r50_layer_names():
    names = [
        f'layer{s + 1}.{b}.conv{c}' for s, n in enumerate((3, 4, 6, 3))
        for b in range(n) for c in (1, 2, 3)
    ]
    return names + [f'layer{s}.0.downsample.0' for s in (1, 2, 3, 4)]


@pytest.fixture(scope='module')
def tool_runs(tmp_path_factory):
    """The runs that go through ``python tools/analysis/complexity.py``
    (in parallel; the other cases call ``main()`` in process, cheaper)."""
    tmp = tmp_path_factory.mktemp('complexity_tool')
    w4a4 = _policy(tmp / 'w4a4.json', R18_LAYERS)
    jobs = {
        'fp': ([R18, '--out', str(tmp / 'fp.json')], tmp / 'fp.json'),
        'w4a4': ([R18, '--policy', w4a4, '--out',
                  str(tmp / 'w4a4.json.out')], tmp / 'w4a4.json.out'),
        'missing': (['configs/gmpq/nope.py'], None),
    }
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    procs = {
        key:
        subprocess.Popen(
            [sys.executable, str(TOOL)] + argv,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True)
        for key, (argv, _) in jobs.items()
    }
    runs = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        out_file = jobs[key][1]
        data = (
            json.loads(out_file.read_text())
            if out_file is not None and out_file.exists() else None)
        runs[key] = dict(rc=proc.returncode, stdout=out, stderr=err, json=data)
    return runs


def _ok(run):
    assert run['rc'] == 0, run['stderr'][-3000:]
    return run['json']


def test_tool_r18_fp(tool_runs):
    run = tool_runs['fp']
    res = _ok(run)
    assert res['model'] == 'full precision'
    assert res['input_shape'] == [3, 32, 32]
    assert res['macs'] * 1e9 == pytest.approx(R18_TOTAL_MACS, abs=1)
    assert round(res['macs'], 3) == 0.555
    assert res['num_quantized'] == 0 and res['bitops_quantized'] == 0
    assert res['bitops_total'] == pytest.approx(R18_TOTAL_MACS * 1024 / 1e9)
    assert res['compression'] == 1.0 and res['compression_quantized'] is None
    assert res['size_mb'] == res['fp_size_mb']
    layers = {row['name']: row for row in res['layers']}
    assert [f'backbone.{n}' for n in R18_LAYERS
            ] == [n for n in layers if n.startswith('backbone.layer')]
    assert layers['head.fc']['macs'] == 5120
    assert all(row['w_bits'] == 32 for row in res['layers'])
    # The independent cross-check: mmengine's FlopAnalyzer agrees.
    check = res['check']
    assert check['match'] and check['conv_linear_macs'] == R18_TOTAL_MACS
    assert check['all_ops'] > R18_TOTAL_MACS  # it also counts BN / pooling
    # The printed table and totals.
    out = run['stdout']
    assert 'backbone.layer4.0.downsample.0' in out and 'head.fc' in out
    assert '555.42M total' in out and 'compression 1.00x' in out
    assert 'FlopAnalyzer' in out and 'match' in out


def test_tool_r18_w4a4_policy(tool_runs):
    run = tool_runs['w4a4']
    res = _ok(run)
    assert res['model'] == 'quantized' and res['num_quantized'] == 19
    q_rows = [row for row in res['layers'] if row['quantized']]
    assert [row['name']
            for row in q_rows] == [f'backbone.{n}' for n in R18_LAYERS]
    assert all((r['w_bits'], r['a_bits']) == (4, 4) for r in q_rows)
    assert sum(r['bitops'] for r in q_rows) == 16 * 553_648_128
    assert res['bitops_quantized'] == pytest.approx(16 * 553_648_128 / 1e9)
    fp_rest = R18_TOTAL_MACS - R18_SEARCHED_MACS
    assert res['bitops_total'] == pytest.approx(
        (16 * R18_SEARCHED_MACS + 1024 * fp_rest) / 1e9)
    assert res['compression_quantized'] == pytest.approx(64.0)
    assert res['mean_w_bits'] == 4 and res['mean_a_bits'] == 4
    # Size: the 19 conv weights at 4 bits instead of 32.
    assert res['fp_size_mb'] - res['size_mb'] == pytest.approx(
        R18_SEARCHED_WEIGHTS * (4 - 0.5) / 1e6)
    assert res['macs'] * 1e9 == pytest.approx(R18_TOTAL_MACS, abs=1)
    # The check ran on the FP twin (the tracer cannot read quantizers).
    assert res['check']['match']
    assert 'policy:' in run['stdout'] and 'compression 64.00x' in run['stdout']


def test_tool_missing_config_exit_code(tool_runs):
    run = tool_runs['missing']
    assert run['rc'] != 0
    assert 'configs/gmpq/nope.py' in run['stderr']


# ---------------------------------------------------------------------------
# The tool in process (cheaper): bad input, options, supernet configs
# ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def tool():
    spec = importlib.util.spec_from_file_location('complexity_tool', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


_FLAT = {}


def flat(config):
    """``config`` read once and dumped without ``_base_``: reading an
    ``mmpretrain::`` base parses mmpretrain's model-index metafiles (seconds
    of CPU every time), which the in-process tests need not repeat."""
    if config not in _FLAT:
        import atexit
        import shutil
        import tempfile
        folder = tempfile.mkdtemp(prefix='gmpq_flat_cfg_')
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        path = os.path.join(folder, os.path.basename(config))
        Config.fromfile(str(ROOT / config)).dump(path)
        _FLAT[config] = path
    return _FLAT[config]


def test_tool_missing_policy(tool, at_root, tmp_path, capsys):
    missing = str(tmp_path / 'missing_policy.json')
    assert tool.main([R18, '--policy', missing]) != 0
    err = capsys.readouterr().err
    assert missing in err and 'not found' in err


def test_tool_r50_fp(tool, at_root, tmp_path, capsys):
    out = tmp_path / 'r50.json'
    assert tool.main([flat(R50), '--no-check', '--out', str(out)]) == 0
    res = json.loads(out.read_text())
    assert res['input_shape'] == [3, 32, 32]
    assert res['macs'] * 1e9 == pytest.approx(R50_TOTAL_MACS, abs=1)
    assert len([
        r for r in res['layers'] if r['name'].startswith('backbone.layer')
    ]) == 52
    assert res['check'] is None  # --no-check
    assert '1.30G total' in capsys.readouterr().out


def test_tool_wrong_policy(tool, at_root, tmp_path, capsys):
    wrong = _policy(tmp_path / 'r50_policy.json', _r50_layer_names())
    assert tool.main([flat(R18), '--policy', wrong]) != 0
    err = capsys.readouterr().err
    assert wrong in err
    assert 'layer1.0.conv3' in err  # a layer ResNet-18 does not have


def test_tool_options(tool, at_root, tmp_path, capsys):
    out = tmp_path / 'r.json'
    rc = tool.main([
        flat(R18), '--input-shape', '16', '16', '--cfg-options',
        'model.head.num_classes=100', '--no-check', '--out',
        str(out)
    ])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res['input_shape'] == [3, 16, 16]
    convs = R18_TOTAL_MACS - 5120
    assert res['macs'] * 1e9 == pytest.approx(convs / 4 + 512 * 100, abs=1)


def test_tool_search_config_and_policy(tool, at_root, tmp_path, capsys):
    """The real search config (a GMPQSearchClassifier): counted without its
    teacher, whose checkpoint does not exist here."""
    cfg_file = flat(SEARCH)
    model_cfg = Config.fromfile(cfg_file).model
    assert model_cfg.type == 'GMPQSearchClassifier'
    assert not os.path.exists(model_cfg.teacher_checkpoint)
    out = tmp_path / 'supernet.json'
    # signed=False spares the probe forward of signed='auto' (not the
    # subject here).
    fast = ['--cfg-options', 'model.backbone.signed=False']
    assert tool.main([cfg_file, '--no-check', '--out', str(out)] + fast) == 0
    res = json.loads(out.read_text())
    assert res['model'].startswith('supernet')
    assert res['counted_from'] == 'GMPQSearchClassifier'
    assert res['input_shape'] == [3, 32, 32]
    assert res['num_quantized'] == 19
    # Uniform alphas at init: E[b] = the mean of the candidates.
    e_w = sum(model_cfg.backbone.w_bits) / len(model_cfg.backbone.w_bits)
    e_a = sum(model_cfg.backbone.a_bits) / len(model_cfg.backbone.a_bits)
    assert res['mean_w_bits'] == pytest.approx(e_w)
    assert res['bitops_quantized'] * 1e9 == pytest.approx(R18_SEARCHED_MACS *
                                                          e_w * e_a)
    assert res['macs'] * 1e9 == pytest.approx(R18_TOTAL_MACS, abs=1)
    assert 'teacher' in capsys.readouterr().out

    # --policy replaces the supernet wrapper by a QuantizedBackbone around
    # its inner backbone.
    policy = {n: (2, 6) for n in R18_LAYERS}
    policy['layer1.0.conv1'] = (8, 8)
    path = tmp_path / 'mixed.json'
    save_policy(make_policy(policy), path)
    out = tmp_path / 'mixed_out.json'
    assert tool.main(
        [cfg_file, '--policy',
         str(path), '--no-check', '--out',
         str(out)] + fast) == 0
    res = json.loads(out.read_text())
    assert res['model'] == 'quantized'
    first = conv(64, 64, 3, 32)[0]
    assert res['bitops_quantized'] * 1e9 == pytest.approx(
        first * 64 + (R18_SEARCHED_MACS - first) * 12)
    assert [r['name'] for r in res['layers']
            if r['quantized']] == [f'backbone.{n}' for n in R18_LAYERS]


def test_policy_cfg_rewrite(tool):
    inner = dict(type='ResNet_CIFAR', depth=18)
    for backbone in (inner,
                     dict(
                         type='MixedPrecisionBackbone',
                         backbone=inner,
                         include=['layer*'],
                         w_bits=[2, 4]),
                     dict(
                         type='QuantizedBackbone',
                         backbone=inner,
                         w_bits=4,
                         a_bits=4)):
        cfg = tool.model_cfg_with_policy(
            dict(type='ImageClassifier', backbone=backbone), 'p.json')
        assert cfg['backbone']['type'] == 'QuantizedBackbone'
        assert cfg['backbone']['backbone'] == inner
        assert cfg['backbone']['policy'] == 'p.json'
        assert 'w_bits' not in cfg['backbone']
        assert cfg['backbone'].get('include') == backbone.get('include')
        assert tool.fp_model_cfg(dict(backbone=backbone))['backbone'] == inner
    slim, dropped = tool.countable_model_cfg(
        dict(
            type='GMPQSearchClassifier',
            backbone=inner,
            neck=None,
            head=dict(type='LinearClsHead'),
            teacher='t.py',
            teacher_checkpoint='t.pth'))
    assert dropped == 'GMPQSearchClassifier'
    assert slim == dict(
        type='ImageClassifier',
        backbone=inner,
        head=dict(type='LinearClsHead'))
    cfg = dict(type='ImageClassifier', backbone=inner)
    assert tool.countable_model_cfg(cfg) == (cfg, None)


# ---------------------------------------------------------------------------
# model_complexity / infer_input_shape
# ---------------------------------------------------------------------------
class FakeDDP(nn.Module):

    def __init__(self, module):
        super().__init__()
        self.module = module


def _build(cfg):
    cfg = Config.fromfile(flat(cfg))
    return MODELS.build(cfg.model), cfg


def test_model_complexity_fp_classifier_and_modes():
    model, cfg = _build(DEMO)  # slim ResNet-18, 1 channel, Fashion-MNIST
    model.train()
    model.backbone.layer1.eval()  # a submodule left in eval on purpose
    modes = {n: m.training for n, m in model.named_modules()}
    before = copy.deepcopy(model.state_dict())
    res = model_complexity(FakeDDP(model), cfg)
    assert res['input_shape'] == [1, 28, 28]
    # Slim CIFAR ResNet-18 (16..128 channels) at 28x28, by hand.
    searched = r18_cifar_searched(width=16, hw=28)[0]
    stem = conv(1, 16, 3, 28)[0]
    assert res['macs'] * 1e9 == pytest.approx(
        searched + stem + 128 * 10, abs=1)
    assert res['num_quantized'] == 0 and res['compression'] == 1.0
    assert {n: m.training for n, m in model.named_modules()} == modes
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    json.dumps(res)
    # tools/test.py formats these keys.
    '{bitops_quantized:.4g} {bitops_total:.4g} {size_mb:.3f} ' \
        '{compression:.2f}'.format(**res)


def test_model_complexity_quantized_classifier():
    cfg = Config.fromfile(flat(DEMO))
    cfg.model.backbone = dict(
        type='QuantizedBackbone',
        backbone=cfg.model.backbone,
        w_bits=4,
        a_bits=2,
        signed=False)
    model = MODELS.build(cfg.model)
    res = model_complexity(model, cfg, input_shape=(32, 32))
    assert res['input_shape'] == [1, 32, 32]
    searched = r18_cifar_searched(width=16, hw=32)[0]
    assert res['num_quantized'] == 19
    assert res['bitops_quantized'] * 1e9 == pytest.approx(searched * 8)
    assert res['compression_quantized'] == pytest.approx(128.0)
    assert res['size_mb'] < res['fp_size_mb']
    '{bitops_quantized:.4g} {bitops_total:.4g} {size_mb:.3f} ' \
        '{compression:.2f}'.format(**json.loads(json.dumps(res)))


class _BadHead(nn.Module):

    def forward(self, x):
        raise RuntimeError('needs data samples')


class _Classifier(nn.Module):

    def __init__(self, head=None):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU())
        self.neck = nn.AdaptiveAvgPool2d(1)
        self.head = head


def test_model_complexity_edge_cases():
    # No backbone: None with a warning, or an error when strict.
    with pytest.warns(UserWarning, match='no backbone'):
        assert model_complexity(nn.Linear(2, 2), None) is None
    with pytest.raises(ValueError, match='no backbone'):
        model_complexity(nn.Linear(2, 2), None, strict=True)
    # A head that cannot run on features alone is left out, with a warning.
    with pytest.warns(UserWarning, match='without the head'):
        res = model_complexity(_Classifier(_BadHead()), None, (8, 8))
    assert res['input_shape'] == [2, 8, 8]
    assert res['macs'] * 1e9 == pytest.approx(2 * 4 * 9 * 64)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        res = model_complexity(
            _Classifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 3))),
            dict(complexity_input_shape=[2, 4, 4]))
    assert res['input_shape'] == [2, 4, 4]
    assert [r['name'] for r in res['layers']] == ['backbone.0', 'head.1']
    assert res['macs'] * 1e9 == pytest.approx(2 * 4 * 9 * 16 + 12)


def _loader_cfg(dataset):
    return dict(test_dataloader=dict(dataset=dataset))


@pytest.mark.parametrize('cfg, shape', [
    (_loader_cfg(dict(type='CIFAR10', pipeline=[dict(type='PackInputs')])),
     (3, 32, 32)),
    (_loader_cfg(dict(type='CIFAR100Format')), (3, 32, 32)),
    (_loader_cfg(dict(type='RepeatDataset', dataset=dict(type='CIFAR10'))),
     (3, 32, 32)),
    (_loader_cfg(dict(type='FashionMNIST')), (1, 28, 28)),
    (_loader_cfg(
        dict(
            type='ImageNet',
            pipeline=[
                dict(type='LoadImageFromFile'),
                dict(type='ResizeEdge', scale=256, edge='short'),
                dict(type='CenterCrop', crop_size=224),
                dict(type='PackInputs')
            ])), (3, 224, 224)),
    (_loader_cfg(
        dict(
            type='CustomDataset',
            pipeline=[dict(type='Resize', scale=(320, 240))])), (3, 240, 320)),
    (_loader_cfg(
        dict(
            type='CustomDataset',
            pipeline=[dict(type='RandomResizedCrop', scale=(200, 100))])),
     (3, 200, 100)),
    (_loader_cfg(
        dict(type='CIFAR10', pipeline=[dict(type='Resize', scale=64)])),
     (3, 64, 64)),
    (dict(
        complexity_input_shape=(3, 48, 40),
        **_loader_cfg(dict(type='CIFAR10'))), (3, 48, 40)),
    (dict(val_dataloader=dict(dataset=dict(type='MNIST'))), (1, 28, 28)),
    (None, (3, 224, 224)),
    (dict(
        model=dict(input_shape=(3, 40, 40)),
        **_loader_cfg(dict(type='CIFAR10'))), (3, 40, 40)),
    (Config(dict(test_dataloader=dict(dataset=dict(type='CIFAR10')))),
     (3, 32, 32)),
])
def test_infer_input_shape(cfg, shape):
    assert infer_input_shape(cfg) == shape


def test_infer_input_shape_channels_from_stem():
    stem = nn.Sequential(nn.Conv2d(5, 4, 3))
    cfg = _loader_cfg(dict(type='CIFAR10'))
    assert infer_input_shape(cfg, stem) == (5, 32, 32)
    assert infer_input_shape(cfg, stem, (20, 30)) == (5, 20, 30)
    assert infer_input_shape(cfg, stem, (1, 20, 30)) == (1, 20, 30)
    with pytest.raises(ValueError, match='input shape'):
        infer_input_shape(cfg, stem, (1, 0, 30))
