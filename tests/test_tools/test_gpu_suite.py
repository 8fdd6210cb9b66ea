"""tools/analysis/benchmark_gpu_suite.py: its stages, its estimate of the
CIFAR-10 search's wall time and its summary, on made-up stage results (the
GPU runs themselves need a GPU)."""
import importlib.util
import json
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / 'tools/analysis/' \
    'benchmark_gpu_suite.py'


@pytest.fixture(scope='module')
def suite():
    spec = importlib.util.spec_from_file_location('gpu_suite', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_result(step_s, warmup_s, batch_size=256):
    steps = {}
    for name, ratio in (('fp', 1.0), ('w4a4', 1.1), ('bilevel', 3.0)):
        steps[name] = dict(
            step_s=step_s * ratio,
            images_per_s=batch_size / (step_s * ratio),
            time_vs_fp=ratio,
            peak_gib=2.0 * ratio,
            mem_vs_fp=ratio,
            warmup_s=warmup_s,
            kernels='-' if name == 'fp' else 'compile')
    return dict(batch_size=batch_size, device_name='Fake GPU', results=steps)


def test_stages_cover_the_grid(suite, tmp_path):
    args = suite.parse_args(['--out', str(tmp_path)])
    names = [s[0] for s in suite.stages(args)]
    assert len(names) == 8 and len(set(names)) == 8
    cmd = suite.stage_command(args, 'cifar32', 'amp', 'eager', 'x.json')
    assert cmd[cmd.index('--input-size') + 1] == '32'
    assert cmd[cmd.index('--batch-size') + 1] == '256'
    assert cmd[cmd.index('--backend') + 1] == 'eager'
    assert '--cifar' in cmd and '--amp' in cmd
    cmd = suite.stage_command(args, 'in224', 'fp32', 'compile', 'x.json')
    assert cmd[cmd.index('--batch-size') + 1] == '64'
    assert '--cifar' not in cmd and '--amp' not in cmd


def test_search_estimate_by_hand(suite):
    # 25 epochs x ceil(25,000 / 256) = 98 iterations = 2,450 bilevel steps
    # of 3 x 0.1 s, plus a 30 s warm-up: (735 + 30) / 60 = 12.75 min.
    result = stage_result(0.1, 30.0)
    assert suite.search_estimate(result) == pytest.approx(12.75)
    # Only the 32 px / batch 256 stage says anything about that config.
    assert suite.search_estimate(stage_result(0.1, 30.0, 64)) is None


def test_summary_keeps_failed_stages(suite, tmp_path):
    args = suite.parse_args(['--out', str(tmp_path)])
    (tmp_path / 'cifar32_fp32_compile.json').write_text(
        json.dumps(stage_result(0.1, 30.0)))
    text = suite.summary(args, {
        'cifar32_fp32_compile': 'ok',
        'in224_amp_eager': 'timeout'
    }, 0.0)
    assert '| cifar32_fp32_compile | bilevel | 853 | 3.00 |' in text
    assert '| in224_amp_eager | (timeout) |' in text
    assert 'cifar32_fp32_compile: 12.8 min' in text
    assert 'Fake GPU' in text and 'SMOKE' not in text
