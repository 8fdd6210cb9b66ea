"""tools/analysis/sensitivity.py and gmpq_mm.apis.sensitivity, end to end on
a tiny search config (8..64-channel ResNet-18, tiny CIFAR-10, in process),
and the bad inputs they refuse before any work."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import write_search_configs  # one conftest.py

from gmpq_mm.apis.sensitivity import sensitivity_policy
from gmpq_mm.quantization.budget import random_policy_near_budget
from gmpq_mm.quantization.policy import load_policy
from gmpq_mm.registry import MODELS
from gmpq_mm.utils import register_all_modules

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / 'tools' / 'analysis' / 'sensitivity.py'
# Two candidates each keep the perturbation method to 4 pairs a layer.
SMALL = {'model.backbone.w_bits': [2, 4], 'model.backbone.a_bits': [2, 4]}


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Small tensors: one thread is faster than several on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _teacher(width):
    register_all_modules()
    return MODELS.build(
        dict(
            type='ImageClassifier',
            backbone=dict(
                type='ResNet_CIFAR',
                depth=18,
                stem_channels=width,
                base_channels=width,
                out_indices=(3, )),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(
                type='LinearClsHead',
                num_classes=10,
                in_channels=8 * width,
                loss=dict(type='CrossEntropyLoss'))))


@pytest.fixture(scope='module')
def setup(tmp_path_factory, cifar10_root):
    tmp = tmp_path_factory.mktemp('sensitivity')
    torch.manual_seed(0)
    ckpt = tmp / 'teacher.pth'
    torch.save({'state_dict': _teacher(8).state_dict()}, ckpt)
    config = write_search_configs(tmp, ROOT, cifar10_root, ckpt)
    # MACs of the 19 searched convs at 32 px: every layer at 2x2 bits
    # costs 4x that, at 4x4 bits 16x.
    from gmpq_mm.quantization.complexity import count_macs
    from gmpq_mm.quantization.convert import select_layers
    net = _teacher(8)
    names = select_layers(net.backbone)
    macs = count_macs(net.backbone, (3, 32, 32))
    layer_macs = {n: macs[n].macs for n in names}
    return dict(tmp=tmp, ckpt=str(ckpt), config=str(config), macs=layer_macs)


def _tool():
    spec = importlib.util.spec_from_file_location('sensitivity_tool', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('method', ['hessian', 'perturbation'])
def test_api_allocates_at_the_budget_and_writes_a_finetune_policy(
        setup, method, tmp_path):
    total = sum(setup['macs'].values())
    budget = 9 * total  # between every layer at 2x2 (4x) and 4x4 (16x)
    out = sensitivity_policy(
        setup['config'],
        setup['ckpt'],
        target_bitops=budget,
        tolerance=0.05,
        method=method,
        calib_batches=2,
        num_samples=2,
        calib_method='max',  # the default 'release' runs in the CLI test
        work_dir=str(tmp_path),
        cfg_options=SMALL)
    policy, table = out['policy'], out['table']
    layers = {
        n: (v['w_bits'], v['a_bits'])
        for n, v in policy['layers'].items()
    }
    assert list(layers) == list(setup['macs'])
    cost = sum(setup['macs'][n] * w * a for n, (w, a) in layers.items())
    assert 0.95 * budget <= cost <= budget
    assert policy['bitops'] == table['bitops'] == cost
    assert policy['layer_macs'] == setup['macs']
    # The table names each layer's allocated pair and its sensitivities.
    sens = {r['name']: r['sensitivity'] for r in table['layers']}
    for row in table['layers']:
        assert tuple(row['chosen']) == layers[row['name']]
        assert sorted(row['sensitivity']) == sorted(
            ['w2a2', 'w2a4', 'w4a2', 'w4a4'])
    chosen = sum(sens[n]['w{}a{}'.format(*p)] for n, p in layers.items())
    assert chosen == pytest.approx(table['predicted_loss_increase'])
    # Optimal: no random policy in the same band has a smaller total.
    for seed in range(20):
        other = random_policy_near_budget(
            setup['macs'], (2, 4), (2, 4), budget, seed, tolerance=0.05)
        total_other = sum(sens[n]['w{}a{}'.format(*p)]
                          for n, p in other.items())
        assert chosen <= total_other + 1e-12
    if method == 'hessian':
        assert all('weight_trace' in r and 'input_trace_se' in r
                   for r in table['layers'])
    # Files: the policy loads and a finetune's QuantizedBackbone takes it.
    names = [Path(p).name for p in out['files']]
    assert names == [
        'policy.json', 'sensitivity.json', 'sensitivity.md', 'sensitivity.png'
    ]
    assert load_policy(tmp_path / 'policy.json')['layers'] == \
        policy['layers']
    assert json.loads((tmp_path / 'sensitivity.json').read_text()) == \
        json.loads(json.dumps(table))
    md = (tmp_path / 'sensitivity.md').read_text()
    assert md.count('\n| layer |') == 1 and 'layer4.1.conv2' in md
    backbone = MODELS.build(
        dict(
            type='QuantizedBackbone',
            backbone=dict(
                type='ResNet_CIFAR',
                depth=18,
                stem_channels=8,
                base_channels=8,
                out_indices=(3, )),
            policy=str(tmp_path / 'policy.json')))
    bits = {
        n: m.bits
        for n, m in backbone.named_modules() if hasattr(m, 'bits')
    }
    assert bits == layers


def test_cli_end_to_end_in_process(setup, tmp_path, capsys, png_check):
    total = sum(setup['macs'].values())
    code = _tool().main([
        setup['config'], setup['ckpt'], '--target-bitops',
        str(8 * total), '--calib-batches', '1', '--num-samples', '1',
        '--work-dir',
        str(tmp_path), '--calib-method', 'max', '--cfg-options',
        'model.backbone.w_bits=[2,4]', 'model.backbone.a_bits=[2,4]'
    ])
    out = capsys.readouterr().out
    assert code == 0, out
    assert 'method: hessian on 1 x 4 training images' in out
    assert out.count('written: ') == 4
    policy = load_policy(tmp_path / 'policy.json')
    assert policy['sensitivity_method'] == 'hessian'
    assert 0.98 * 8 * total <= policy['bitops'] <= 8 * total
    import PIL.Image
    with PIL.Image.open(tmp_path / 'sensitivity.png') as image:
        size = image.size
    png_check(tmp_path / 'sensitivity.png', size)


def _refused(setup, tmp_path, match, error=ValueError, **kwargs):
    args = dict(target_bitops=9 * sum(setup['macs'].values()))
    args.update(kwargs)
    config = args.pop('config', setup['config'])
    ckpt = args.pop('checkpoint', setup['ckpt'])
    with pytest.raises(error, match=match) as info:
        sensitivity_policy(config, ckpt, work_dir=str(tmp_path), **args)
    assert '\n' not in str(info.value)
    assert not list(tmp_path.iterdir())  # refused before any work
    return str(info.value)


def test_unreachable_budget_is_refused_naming_the_field(setup, tmp_path):
    cheapest = 4 * sum(setup['macs'].values())
    msg = _refused(
        setup, tmp_path, 'target_bitops', target_bitops=cheapest - 1)
    assert 'smallest reachable' in msg
    _refused(
        setup, tmp_path, 'target_bitops must be a positive', target_bitops=-5)
    _refused(setup, tmp_path, 'give a budget', target_bitops=None)
    _refused(
        setup,
        tmp_path,
        'target_size_mb must be a positive',
        target_size_mb='1')
    msg = _refused(
        setup, tmp_path, 'target_size_mb=0.001', target_size_mb=0.001)
    assert 'size budget' in msg


def test_size_budget_alone_and_with_bitops(setup, tmp_path):
    from gmpq_mm.quantization.complexity import complexity_report
    total = sum(setup['macs'].values())
    # Sizes reach 0.0519 MB (every searched weight at 2 bits) to 0.0955
    # (at 4 bits); BitOPs 4x to 16x the MACs.
    for kwargs in (dict(target_size_mb=0.07),
                   dict(target_size_mb=0.07, target_bitops=12 * total)):
        out = sensitivity_policy(
            setup['config'],
            setup['ckpt'],
            tolerance=0.1,
            calib_batches=1,
            num_samples=1,
            calib_method='max',
            cfg_options=SMALL,
            **kwargs)
        policy = out['policy']
        assert 0.063 <= policy['size_mb'] <= 0.07
        assert policy['size_budget_mb'] == 0.07
        if 'target_bitops' in kwargs:
            assert 10.8 * total <= policy['bitops'] <= 12 * total
        # The size as the complexity report counts the finetuned network.
        net = MODELS.build(
            dict(
                type='ImageClassifier',
                backbone=dict(
                    type='QuantizedBackbone',
                    backbone=dict(
                        type='ResNet_CIFAR',
                        depth=18,
                        stem_channels=8,
                        base_channels=8,
                        out_indices=(3, )),
                    policy=policy),
                neck=dict(type='GlobalAveragePooling'),
                head=dict(
                    type='LinearClsHead', num_classes=10, in_channels=64)))
        report = complexity_report(net, (3, 32, 32))
        assert report['totals']['size_mb'] == pytest.approx(
            policy['size_mb'], rel=1e-9)


def test_checkpoint_of_another_network_is_refused(setup, tmp_path):
    other = tmp_path.parent / 'wide_teacher.pth'
    torch.save({'state_dict': _teacher(16).state_dict()}, other)
    msg = _refused(
        setup, tmp_path, 'does not fit the network', checkpoint=str(other))
    assert str(other) in msg and 'shape mismatch' in msg
    _refused(
        setup,
        tmp_path,
        'checkpoint not found: /nonexistent.pth',
        error=FileNotFoundError,
        checkpoint='/nonexistent.pth')


def test_missing_calibration_data_is_refused(setup, tmp_path):
    msg = _refused(
        setup,
        tmp_path,
        'calibration data not found: train_dataloader.dataset',
        error=FileNotFoundError,
        cfg_options={'train_dataloader.dataset.data_root': '/no/such/data'})
    assert '/no/such/data' in msg


def test_other_bad_arguments_are_refused(setup, tmp_path):
    _refused(setup, tmp_path, 'method must be one of', method='fisher')
    _refused(
        setup,
        tmp_path,
        'calib_batches must be a positive int',
        calib_batches=0)
    _refused(
        setup,
        tmp_path, 'model.backbone must be a '
        'MixedPrecisionBackbone',
        cfg_options={'model.backbone.type': 'ResNet_CIFAR'})


def test_cli_error_is_one_line(setup, tmp_path, capsys):
    code = _tool().main([
        setup['config'], setup['ckpt'], '--target-bitops', '1', '--work-dir',
        str(tmp_path)
    ])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith('error: target_bitops=1') and '\n' not in err
