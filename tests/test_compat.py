"""gmpq_mm.compat: what differs across the supported stack.

These run on every stack CI builds (oldest and newest, README: Install);
the shims whose trigger a stack lacks are forced here (a hidden
``pkg_resources``, a faked torch version) so both branches are exercised
on each of them.
"""
import os
import os.path as osp
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from gmpq_mm import compat

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def test_version_tuple():
    assert compat.version_tuple('2.1.2+cu121') == (2, 1, 2)
    assert compat.version_tuple('2.15.0') == (2, 15, 0)
    assert compat.version_tuple('2.5.0rc1') == (2, 5, 0)
    assert compat.version_tuple('1.26.4') < compat.version_tuple('2.0')
    assert compat.version_tuple('0.10.7') < compat.version_tuple('0.11')


def _requirement_bounds(name):
    """``{package: (low, high)}`` from ``>=low,<high`` lines of a file."""
    bounds = {}
    with open(osp.join(ROOT, 'requirements', f'{name}.txt')) as f:
        for line in f:
            m = re.match(r'^([\w-]+)>=([\d.]+),<([\d.]+)\s*$',
                         line.split('#')[0])
            if m:
                bounds[m.group(1)] = (m.group(2), m.group(3))
    return bounds


def test_supported_ranges_match_requirements():
    """One set of bounds: what pip installs is what the import accepts."""
    runtime = _requirement_bounds('runtime')
    lite = _requirement_bounds('lite')
    mim = _requirement_bounds('mminstall')
    for pkg in ('torch', 'torchvision', 'numpy', 'mmengine', 'mmpretrain'):
        assert runtime[pkg] == compat.SUPPORTED[pkg], pkg
    assert lite['mmcv-lite'] == compat.SUPPORTED['mmcv']
    assert mim['mmcv'] == compat.SUPPORTED['mmcv']
    for pkg in ('mmengine', 'mmpretrain'):
        assert mim[pkg] == compat.SUPPORTED[pkg], pkg


def test_this_stack_is_supported():
    assert compat.unsupported_versions() == []


def test_unsupported_version_message(monkeypatch):
    found = {'torch': '2.0.1', 'numpy': '2.5.0', 'mmcv': '2.2.0'}
    monkeypatch.setattr(compat, '_installed_version', found.get)
    monkeypatch.delenv(compat.SKIP_CHECK_ENV, raising=False)
    with pytest.raises(compat.UnsupportedStackError) as info:
        compat.check_versions()
    msg = str(info.value)
    assert '\n' not in msg
    assert 'torch 2.0.1 (supported: >=2.1,<2.16)' in msg
    assert 'numpy 2.5.0 (supported: >=1.26,<2.5)' in msg
    assert 'mmcv' not in msg  # 2.2.0 is in range
    monkeypatch.setenv(compat.SKIP_CHECK_ENV, '1')
    compat.check_versions()  # told to skip: no error


def test_old_torch_with_numpy_2_is_refused(monkeypatch):
    found = {'torch': '2.1.2+cu121', 'numpy': '2.4.6'}
    monkeypatch.setattr(compat, '_installed_version', found.get)
    assert compat.unsupported_versions() == [
        'numpy 2.4.6 with torch 2.1.2+cu121 (torch<2.3 needs numpy<2)'
    ]
    found.update(torch='2.3.0')
    assert compat.unsupported_versions() == []
    found.update(torch='2.1.2', numpy='1.26.4')
    assert compat.unsupported_versions() == []


def test_old_torch_stops_the_tools_in_one_line_not_the_numerics():
    """The real path: torch reports 2.0.1. The numerics still import;
    tools/train.py stops with one line (no traceback) naming the range."""
    code = ('import runpy, sys, torch; torch.__version__ = "2.0.1"\n'
            'import gmpq_mm.quantization, gmpq_mm.utils.bit_record\n'
            'sys.argv = ["tools/train.py", '
            '"configs/gmpq/pretrain_r18_cifar10.py"]\n'
            'runpy.run_path("tools/train.py", run_name="__main__")\n')
    env = {k: v for k, v in os.environ.items() if k != compat.SKIP_CHECK_ENV}
    env['PYTHONPATH'] = ROOT
    proc = subprocess.run([sys.executable, '-c', code],
                          cwd=ROOT,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith('error: gmpq_mm does not support torch '
                               '2.0.1 (supported: >=2.1,<2.16)'), proc.stderr


def test_is_autocast_enabled():
    assert not compat.is_autocast_enabled('cpu')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert compat.is_autocast_enabled('cpu')
        assert not compat.is_autocast_enabled('cuda')
    assert not compat.is_autocast_enabled('cpu')


def test_package_lookup_without_pkg_resources():
    import mmpretrain
    assert compat._is_installed('mmpretrain')
    assert not compat._is_installed('no_such_package_gmpq')
    assert compat._get_installed_path('mmpretrain') == osp.dirname(
        mmpretrain.__file__)
    mmcv_dist = next(
        d for d in ('mmcv', 'mmcv-lite', 'mmcv-full') if _has_dist(d))
    assert compat._package2module(mmcv_dist) == 'mmcv'


def _has_dist(name):
    import importlib.metadata
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_mmpretrain_config_bases_without_pkg_resources():
    """A config with ``mmpretrain::`` bases loads with pkg_resources gone
    (as under setuptools >= 81), once gmpq_mm's types are registered."""
    code = '\n'.join([
        'import sys',
        'sys.modules["pkg_resources"] = None  # import fails, as if absent',
        'from gmpq_mm.utils import register_all_modules',
        'register_all_modules()',
        'from mmengine.config import Config',
        'cfg = Config.fromfile("configs/gmpq/pretrain_r18_cifar10.py")',
        'print(cfg.model.backbone.type, cfg.default_scope)',
    ])
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, '-c', code],
                          cwd=ROOT,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == 'mmpretrain'


def test_retrieval_metrics_on_any_numpy():
    """mmpretrain's retrieval metrics call np.in1d (gone in numpy 2.4);
    values computed by hand: positives at ranks 1 and 2 -> AP (1/2 + 2/3)/2.
    """
    compat.patch_numpy_removed_apis()
    from mmpretrain.evaluation.metrics import retrieval
    ap = retrieval._calculateAp_for_sample(
        torch.tensor([3, 1, 2]), torch.tensor([1, 2]), 'IR')
    assert ap == pytest.approx((1 / 2 + 2 / 3) / 2 * 100)
    recall = retrieval.RetrievalRecall.calculate([torch.tensor([3, 1, 2])],
                                                 [torch.tensor([1])],
                                                 topk=(1, 2),
                                                 pred_indices=True,
                                                 target_indices=True)
    assert [float(r) for r in recall] == [0.0, 100.0]
    if not hasattr(np, 'in1d'):
        assert isinstance(retrieval.np, compat._NumpyWithRemovedApis)
        assert not hasattr(np, 'in1d')  # numpy itself left alone


def test_in1d_matches_isin():
    a = np.array([[1, 5], [2, 7]])
    assert compat._in1d(a, [2, 5]).tolist() == [False, True, True, False]
    assert compat._in1d(
        a, [2, 5], invert=True).tolist() == [True, False, False, True]


def test_moved_names_live_beside_the_engine_only():
    """Trust and launching moved to the engine; compat does not hand them
    out under the old names (no arrow from compat back up to floor 2)."""
    from gmpq_mm.engine import checkpoint_load, launch
    assert callable(checkpoint_load.load_checkpoint_file)
    assert callable(launch.finish_distributed)
    for old in ('load_trusted_checkpoint', 'finish_distributed'):
        with pytest.raises(AttributeError):
            getattr(compat, old)


def test_compat_holds_version_differences_only():
    """No trust policy, launching or logging left in compat.py."""
    names = {n for n in vars(compat) if not n.startswith('__')}
    for moved in ('load_trusted_checkpoint', 'prepare_cpu_distributed',
                  'print_log', 'patch_checkpoint_loading', '_load_http'):
        assert moved not in names, moved
