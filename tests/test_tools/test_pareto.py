"""tools/analysis/pareto.py end to end, its table / front logic and the
``quantization`` record tools/test.py writes.

The results are written by hand in the format of ``tools/test.py --out``;
which rows are Pareto-optimal is worked out by hand below.
"""
import importlib.util
import json
from pathlib import Path

import pytest
from mmengine.config import Config

from gmpq_mm.quantization.policy import make_policy, save_policy
from gmpq_mm.utils.quantization_summary import quantization_summary
from gmpq_mm.visualization.pareto_table import (bits_kind, pareto_optimal,
                                                result_row)

ROOT = Path(__file__).resolve().parents[2]
TOOL = 'tools/analysis/pareto.py'
PNG_SIZE = (900, 600)  # PARETO_FIGSIZE (9, 6) at 100 dpi

# name: (top-1, BitOPs searched G, BitOPs whole net G, per-layer bits)
# Searched-layer front by hand: w2a2 (2.5, 60) -> mixed_a (6, 67) ->
# w4a4 (10, 68). mixed_b (7, 62) is beaten by mixed_a (less BitOPs, more
# top-1), mixed_c (6, 66) by mixed_a (same BitOPs, more top-1). fp has no
# searched layers: not on that axis. On the whole-net axis fp (100, 70) is
# the most accurate, so it joins the front.
RESULTS = {
    'fp': (70.0, 0.0, 100.0, []),
    'w2a2': (60.0, 2.5, 12.5, [(2, 2), (2, 2)]),
    'mixed_a': (67.0, 6.0, 16.0, [(4, 2), (2, 4)]),
    'mixed_b': (62.0, 7.0, 17.0, [(3, 2), (2, 2)]),
    'mixed_c': (66.0, 6.0, 16.0, [(2, 3), (3, 2)]),
    'w4a4': (68.0, 10.0, 20.0, [(4, 4), (4, 4)]),
}
FRONT_SEARCHED = ['w2a2', 'mixed_a', 'w4a4']
FRONT_TOTAL = ['w2a2', 'mixed_a', 'w4a4', 'fp']


def result_json(top1, searched, total, bits, layers=True):
    """A test result as tools/test.py --out writes it (FP stem and head,
    two searched convs)."""
    rows = [dict(name='backbone.conv1', w_bits=32, a_bits=32, quantized=False)]
    names = ['backbone.layer1.0.conv1', 'backbone.layer1.0.conv2']
    for name, (w, a) in zip(names, bits):
        rows.append(dict(name=name, w_bits=w, a_bits=a, quantized=True))
    rows.append(dict(name='head.fc', w_bits=32, a_bits=32, quantized=False))
    fp_searched = 0.0 if not bits else 8.0 * 1024 / 16  # 512 G
    complexity = dict(
        bitops_quantized=searched,
        bitops_total=total,
        fp_bitops_quantized=fp_searched,
        compression=100.0 / total,
        compression_quantized=fp_searched / searched if searched else None,
        size_mb=total / 10,
        mean_w_bits=None,
        mean_a_bits=None)
    if layers:
        complexity['layers'] = rows
    return dict(
        config='configs/x.py',
        checkpoint='x.pth',
        metrics={
            'accuracy/top1': top1,
            'accuracy/top5': 99.0
        },
        complexity=complexity)


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / 'results'
    folder.mkdir()
    paths = []
    for name, spec in RESULTS.items():
        path = folder / f'{name}.json'
        path.write_text(json.dumps(result_json(*spec)))
        paths.append(path)
    return paths


def table_rows(markdown):
    """``[(star, name, kind, top1, searched, total, size, comp, bits)]``."""
    rows = []
    for line in markdown.splitlines()[2:]:
        if not line.startswith('| '):
            break
        cells = [c.strip() for c in line.strip('|').split('|')]
        cells[1] = cells[1].strip('*')
        rows.append(tuple(cells))
    return rows


def tool_module():
    spec = importlib.util.spec_from_file_location('gmpq_pareto', ROOT / TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pareto_optimal_by_hand():
    points = [(2.5, 60), (6, 67), (7, 62), (6, 66), (10, 68), (None, 70),
              (10, 68)]
    assert pareto_optimal(points) == [
        True, True, False, False, True, False, True
    ]  # identical points: both
    assert pareto_optimal([(1, 50)]) == [True]


def test_kinds():
    assert bits_kind([]) == 'FP32' and bits_kind(None) == 'FP32'
    assert bits_kind([(4, 4)] * 3) == 'W4A4'
    assert bits_kind([(4, 2), (4, 2)]) == 'W4A2'
    assert bits_kind([(4, 4), (4, 2)]) == 'mixed'
    row = result_row('m', result_json(*RESULTS['mixed_a']), [(4, 2), (2, 4)])
    assert (row['kind'], row['group']) == ('mixed', 'mixed')
    assert (row['mean_w_bits'], row['mean_a_bits']) == (3.0, 3.0)
    assert row['compression_searched'] == pytest.approx(512 / 6)


def test_table_and_plot_end_to_end(run_in_process, png_check, results,
                                   tmp_path):
    md, png = tmp_path / 'out' / 'pareto.md', tmp_path / 'out' / 'p.png'
    out = run_in_process(
        [TOOL] + results +
        ['--out-md', md, '--out-png', png, '--title', 'tiny']).output
    png_check(png, PNG_SIZE)
    assert f'written: {png}' in out and f'written: {md}' in out
    rows = table_rows(md.read_text())
    # Sorted by searched BitOPs (ties: more accurate first), fp last.
    assert [r[1] for r in rows
            ] == ['w2a2', 'mixed_a', 'mixed_c', 'mixed_b', 'w4a4', 'fp']
    assert [r[1] for r in rows if r[0] == '★'] == FRONT_SEARCHED
    by_name = {r[1]: r for r in rows}
    assert by_name['w2a2'][2:] == ('W2A2', '60.00', '2.5', '12.5', '1.25',
                                   '204.80x', '2.00 / 2.00')
    assert by_name['mixed_a'][2:] == ('mixed', '67.00', '6', '16', '1.6',
                                      '85.33x', '3.00 / 3.00')
    assert by_name['mixed_b'][8] == '2.50 / 2.00'
    assert by_name['w4a4'][2] == 'W4A4'
    assert by_name['fp'][2:] == ('FP32', '70.00', '–', '100', '10', '1.00x',
                                 '–')
    assert md.read_text() in out  # the same table printed


def test_whole_network_axis(results, tmp_path, capsys, png_check):
    png = tmp_path / 'total.png'
    assert tool_module().main([str(p) for p in results] +
                              ['--bitops', 'total', '--out-png',
                               str(png)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [r[1] for r in rows if r[0] == '★'] == FRONT_TOTAL
    assert {r[1]: r[7] for r in rows}['w2a2'] == '8.00x'  # 100 / 12.5
    png_check(png, PNG_SIZE)


def test_kind_from_policy_record_and_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    policy = save_policy(
        make_policy({
            'layer1.0.conv1': (3, 3),
            'layer1.0.conv2': (3, 3)
        }), tmp_path / 'w3a3_policy.json')
    # No per-layer rows: the bits come from --policy, the recorded
    # quantization, or the result's config.
    by_policy = result_json(65.0, 5.0, 15.0, [], layers=False)
    recorded = dict(
        result_json(64.0, 4.0, 14.0, [], layers=False),
        quantization=dict(
            backbone='QuantizedBackbone', policy=None, w_bits=2, a_bits=4))
    by_config = dict(
        result_json(66.0, 9.0, 19.0, [], layers=False),
        config='configs/gmpq/finetune_r18_w4a4_in1k.py')
    paths = []
    for name, result in (('a', by_policy), ('b', recorded), ('c', by_config)):
        paths.append(tmp_path / f'{name}.json')
        paths[-1].write_text(json.dumps(result))
    assert tool_module().main([str(p) for p in paths] +
                              ['--policy', policy, '-', '-']) == 0
    kinds = {r[1]: r[2] for r in table_rows(capsys.readouterr().out)}
    assert kinds == {'a': 'W3A3', 'b': 'W2A4', 'c': 'W4A4'}


def test_policy_in_the_wrong_order_is_an_error(results, tmp_path, capsys):
    policy = save_policy(
        make_policy({
            'layer1.0.conv1': (4, 4),
            'layer1.0.conv2': (4, 4)
        }), tmp_path / 'w4a4_policy.json')
    md = tmp_path / 'x.md'
    code = tool_module().main([
        str(results[1]),
        str(results[5]), '--policy', policy, '-', '--out-md',
        str(md)
    ])
    assert code == 1
    err = capsys.readouterr().err
    assert f'error: {policy}: layer layer1.0.conv1 is W4A4 but ' \
        f'{results[1]} was measured at W2A2' in err
    assert not md.exists()


@pytest.mark.parametrize('content, match', [
    ('{"config": "x.py", "metrics": ', 'malformed JSON at line 1'),
    (json.dumps({'config': 'x.py'}), 'no "metrics" with a number'),
    (json.dumps({'metrics': {
        'accuracy/top5': 90.0
    }}), 'no "metrics" with a number "accuracy/top1"'),
    (json.dumps({
        'metrics': {
            'accuracy/top1': 9.0
        },
        'complexity': {
            'bitops_total': 1.0
        }
    }), '"complexity" lacks numbers for'),
    (None, 'result file not found'),
])
def test_bad_result_names_the_file_and_writes_nothing(results, tmp_path,
                                                      capsys, content, match):
    bad = tmp_path / 'bad.json'
    if content is not None:
        bad.write_text(content)
    md, png = tmp_path / 'o' / 't.md', tmp_path / 'o' / 't.png'
    code = tool_module().main([
        str(results[0]),
        str(bad), '--out-md',
        str(md), '--out-png',
        str(png)
    ])
    assert code == 1
    err = capsys.readouterr().err
    assert str(bad) in err and match in err
    assert not (tmp_path / 'o').exists()


def test_quantization_summary_of_configs(monkeypatch):
    monkeypatch.chdir(ROOT)
    uniform = Config.fromfile('configs/gmpq/finetune_r18_w4a4_in1k.py')
    assert quantization_summary(uniform.model) == dict(
        backbone='QuantizedBackbone', policy=None, w_bits=4, a_bits=4)
    mixed = Config.fromfile('configs/gmpq/demo/finetune_r18_fashion_mnist.py')
    assert quantization_summary(mixed.model) == dict(
        backbone='QuantizedBackbone',
        policy='work_dirs/demo/search/policy.json',
        w_bits=None,
        a_bits=None)
    fp = Config.fromfile('configs/gmpq/demo/pretrain_r18_fashion_mnist.py')
    assert quantization_summary(fp.model) is None
    inline = {
        'format': 'gmpq-policy',
        'version': 1,
        'layers': {
            'a': {
                'w_bits': 2,
                'a_bits': 2
            }
        }
    }
    supernet = dict(
        backbone=dict(
            type='MixedPrecisionBackbone',
            w_bits=(2, 4),
            a_bits=(2, 4),
            backbone=dict(type='ResNet')))
    assert quantization_summary(supernet)['w_bits'] == [2, 4]
    quantized = dict(backbone=dict(type='QuantizedBackbone', policy=inline))
    assert quantization_summary(quantized)['policy'] == inline
