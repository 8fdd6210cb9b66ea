"""tools/visualization/plot_policy.py end to end, and its drawing module.

Totals are checked against sums made by hand here: BitOPs = sum MACs * w *
a, size = sum weights * w_bits / 8 bytes, MB = 1e6 bytes (as in
gmpq_mm.quantization.complexity).
"""
import importlib.util
import json
import os
from pathlib import Path

import pytest

from gmpq_mm.quantization.policy import make_policy, save_policy
from gmpq_mm.visualization.policy_plot import (format_bitops, policy_figure,
                                               policy_figure_size,
                                               policy_totals)

ROOT = Path(__file__).resolve().parents[2]
TOOL = 'tools/visualization/plot_policy.py'
DEMO_FP = 'configs/gmpq/demo/pretrain_r18_fashion_mnist.py'

# Three layers: (w_bits, a_bits), MACs, weights.
LAYERS = {
    'layer1.0.conv1': ((4, 4), 1_000_000, 1_000),
    'layer1.0.conv2': ((2, 3), 2_000_000, 4_000),
    'layer2.0.conv1': ((6, 2), 500_000, 16_000),
}
# 1e6*4*4 + 2e6*2*3 + 5e5*6*2 = 16e6 + 12e6 + 6e6
BITOPS = 34_000_000
FP_BITOPS = 3_500_000 * 32 * 32  # 3584e6: 105.41x
# (1000*4 + 4000*2 + 16000*6) bits = 108000 bits = 13500 bytes
SIZE_MB = 0.0135
FP_SIZE_MB = 21_000 * 4 / 1e6  # 0.084 MB: 6.22x
PNG_3_LAYERS = (1000, 650)  # figsize (10, 6.5) at 100 dpi


def tiny_policy(with_counts=True):
    meta = dict(w_candidates=[2, 3, 4, 6], a_candidates=[2, 3, 4, 6])
    if with_counts:
        meta.update(
            layer_macs={
                n: m
                for n, (_, m, _) in LAYERS.items()
            },
            layer_params={
                n: p
                for n, (_, _, p) in LAYERS.items()
            })
    return make_policy({n: bits for n, (bits, _, _) in LAYERS.items()}, **meta)


def tool_module():
    spec = importlib.util.spec_from_file_location('gmpq_plot_policy',
                                                  ROOT / TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_totals_and_title_by_hand():
    policy = tiny_policy()
    totals = policy_totals(policy, policy['layer_macs'],
                           policy['layer_params'])
    assert totals['bitops'] == BITOPS
    assert totals['fp_bitops'] == FP_BITOPS
    assert totals['bitops_compression'] == pytest.approx(3584 / 34)
    assert totals['size_mb'] == pytest.approx(SIZE_MB)
    assert totals['fp_size_mb'] == pytest.approx(FP_SIZE_MB)
    assert totals['size_compression'] == pytest.approx(672 / 108)
    assert (totals['mean_w_bits'], totals['mean_a_bits']) == (4, 3)

    fig = policy_figure(
        policy,
        policy['layer_macs'],
        policy['layer_params'],
        title='tiny.json')
    title = fig._suptitle.get_text()
    for part in ('tiny.json', '3 searched layers', 'BitOPs 34 M',
                 '105.4x less than FP32', 'weights 0.0135 MB',
                 '6.2x smaller than FP32, 0.084 MB', 'W 4.00 / A 3.00'):
        assert part in title, (part, title)
    bits_ax = fig.axes[0]
    assert [t.get_text()
            for t in fig.axes[1].get_xticklabels()] == list(LAYERS)
    assert [t for t in bits_ax.get_yticks()] == [2, 3, 4, 6]
    heights = [[bar.get_height() for bar in bars]
               for bars in bits_ax.containers]
    assert heights == [[4, 2, 6], [4, 3, 2]]  # weight bars, activation bars


def test_units_and_sizes():
    assert format_bitops(121_241_600) == '0.121 G'
    assert format_bitops(34e6) == '34 M'
    assert format_bitops(1.853e12) == '1.85 T'
    assert policy_figure_size(3) == (10.0, 6.5)
    assert policy_figure_size(50) == pytest.approx((19.0, 6.5))


def test_plot_from_policy_counts(run_in_process, png_check, tmp_path):
    path = save_policy(tiny_policy(), tmp_path / 'tiny.json')
    out = run_in_process([TOOL, path]).output
    png = tmp_path / 'tiny.png'  # default: next to the policy
    png_check(png, PNG_3_LAYERS)
    assert f'written: {png}' in out
    assert f'BitOPs: {BITOPS} (34 M; FP32 3.58 G, compression 105.41x)' \
        in out
    assert 'weights: 0.013500 MB at their bits (FP32 0.084000 MB, ' \
        'compression 6.22x' in out
    assert 'mean bits: W 4.00, A 3.00' in out


def test_old_policy_without_counts_needs_config(tmp_path, capsys):
    path = save_policy(tiny_policy(with_counts=False), tmp_path / 'old.json')
    assert tool_module().main([path, '--out', str(tmp_path / 'x.png')]) == 1
    err = capsys.readouterr().err
    assert f'error: {path}: the policy has no "layer_macs"' in err
    assert '--config CONFIG' in err
    assert os.listdir(tmp_path) == ['old.json']


@pytest.mark.parametrize('text, match', [
    ('{"format": "gmpq-policy", "version": 1, "layers": {', 'malformed JSON'),
    (json.dumps({
        'format': 'gmpq-policy',
        'version': 1,
        'layers': {
            'a': {
                'w_bits': 1,
                'a_bits': 4
            }
        }
    }), 'w_bits'),
    (json.dumps({
        'format': 'other',
        'layers': {}
    }), '"format" must be'),
])
def test_malformed_policy_writes_nothing(tmp_path, capsys, text, match):
    path = tmp_path / 'bad.json'
    path.write_text(text)
    assert tool_module().main([str(path)]) == 1
    err = capsys.readouterr().err
    assert f'error: {path}: ' in err and match in err
    assert os.listdir(tmp_path) == ['bad.json']


def conv(cin, cout, k, hw):
    """MACs and weights of a bias-free k x k conv with an hw x hw output."""
    return cin * cout * k * k * hw * hw, cin * cout * k * k


def slim_r18_28px():
    """name -> (MACs, weights) of the 19 searched convs of the demo's
    ResNet-18 (CIFAR stem, 16..128 channels) on 1 x 28 x 28 input."""
    out = {}
    for block in ('0', '1'):
        for i in ('1', '2'):
            out[f'layer1.{block}.conv{i}'] = conv(16, 16, 3, 28)
    for stage, hw in ((2, 14), (3, 7), (4, 4)):
        c = 16 * 2**(stage - 1)
        out[f'layer{stage}.0.conv1'] = conv(c // 2, c, 3, hw)
        out[f'layer{stage}.0.conv2'] = conv(c, c, 3, hw)
        out[f'layer{stage}.0.downsample.0'] = conv(c // 2, c, 1, hw)
        out[f'layer{stage}.1.conv1'] = conv(c, c, 3, hw)
        out[f'layer{stage}.1.conv2'] = conv(c, c, 3, hw)
    return out


def test_config_counts_an_old_policy(tmp_path, capsys, png_check, monkeypatch):
    monkeypatch.chdir(ROOT)
    counts = slim_r18_28px()
    bits = {
        name: ((6, 4) if 'downsample' in name else (2, 3))
        for name in counts
    }
    path = save_policy(
        make_policy(bits, input_shape=[1, 28, 28]), tmp_path / 'old.json')
    out = tmp_path / 'figs' / 'old_policy.png'
    assert tool_module().main([path, '--config', DEMO_FP, '--out',
                               str(out)]) == 0
    printed = capsys.readouterr().out
    bitops = sum(m * w * a
                 for (m, _), (w, a) in zip(counts.values(), bits.values()))
    size_mb = sum(
        p * w
        for (_, p), (w, _) in zip(counts.values(), bits.values())) / 8 / 1e6
    assert f'BitOPs: {bitops} (' in printed
    assert f'weights: {size_mb:.6f} MB at their bits' in printed
    assert f'counted on {DEMO_FP} at input (1, 28, 28)' in printed
    width = max(10.0, 3.0 + 0.32 * 19)
    png_check(out, (round(width * 100), 650))


def test_config_rejects_another_networks_policy(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    policy = make_policy({'features.0.conv': (4, 4), 'layer1.0.conv1': (2, 2)})
    path = save_policy(policy, tmp_path / 'mobilenet.json')
    out = tmp_path / 'mobilenet.png'
    assert tool_module().main([path, '--config', DEMO_FP, '--out',
                               str(out)]) == 1
    err = capsys.readouterr().err
    assert f'error: {path}: policy does not fit the model' in err
    assert "missing layer(s) ['layer1.0.conv2'" in err
    assert "['features.0.conv'] not quantized by the model" in err
    assert os.listdir(tmp_path) == ['mobilenet.json']
