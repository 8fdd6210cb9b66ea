"""Checkpoint files: written whole or not at all, read without running
code unless trusted, and every failure said in one line."""
import errno
import os
import os.path as osp
import pickle
import re
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch

from gmpq_mm import compat
from gmpq_mm.engine import checkpoint_load, checkpoint_save

CLASSES = ('tench', 'goldfish', 'great white shark')


@pytest.fixture(autouse=True)
def default_trust(monkeypatch):
    """Each test starts from the default (neither switch set)."""
    monkeypatch.delenv(checkpoint_load.TRUST_ENV, raising=False)
    monkeypatch.delenv(checkpoint_load.STRICT_LOAD_ENV, raising=False)


# ------------------------------------------------------------ writing --
def test_atomic_save_writes_a_loadable_file(tmp_path):
    path = tmp_path / 'epoch_1.pth'
    checkpoint_save.save_checkpoint_atomic(
        {'state_dict': {
            'w': torch.ones(3)
        }}, str(path))
    assert os.listdir(tmp_path) == ['epoch_1.pth']
    ckpt = checkpoint_load.load_checkpoint_file(str(path))
    assert torch.equal(ckpt['state_dict']['w'], torch.ones(3))


def test_full_disk_leaves_nothing_and_says_so_in_one_line(
        tmp_path, monkeypatch):
    path = tmp_path / 'epoch_1.pth'
    old = tmp_path / 'epoch_0.pth'
    old.write_bytes(b'a finished checkpoint')

    def half_then_enospc(tmp, data):
        with open(tmp, 'wb') as f:
            f.write(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(checkpoint_save, '_write_bytes', half_then_enospc)
    state = {'state_dict': {'w': torch.zeros(1000)}}
    with pytest.raises(checkpoint_save.CheckpointWriteError) as info:
        checkpoint_save.save_checkpoint_atomic(state, str(path))
    msg = str(info.value)
    assert '\n' not in msg
    assert msg.startswith(f'{path}: no space left')
    size = len(_serialised(state))
    assert f'({size} bytes)' in msg and 'free in' in msg
    # Nothing under the name, no half-written temporary, the rest intact.
    assert sorted(os.listdir(tmp_path)) == ['epoch_0.pth']
    assert old.read_bytes() == b'a finished checkpoint'


def _serialised(obj):
    import io
    with io.BytesIO() as f:
        torch.save(obj, f)
        return f.getvalue()


def _dead_pid():
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_writers_go_at_the_next_write(tmp_path):
    dead = tmp_path / f'.epoch_1.pth.{_dead_pid()}.k2j4h1.tmp'
    live = tmp_path / f'.epoch_1.pth.{os.getpid()}.a8d7s6.tmp'
    other = tmp_path / '.notes.txt.12.x.tmp'  # not a checkpoint's
    for f in (dead, live, other):
        f.write_bytes(b'partial')
    checkpoint_save.save_checkpoint_atomic({'state_dict': {}},
                                           str(tmp_path / 'epoch_2.pth'))
    assert sorted(os.listdir(tmp_path)) == sorted(
        ['epoch_2.pth', live.name, other.name])


def test_the_runner_saves_through_it():
    import mmengine.runner.runner as runner_module

    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    assert runner_module.save_checkpoint is checkpoint_save._save_checkpoint


def test_train_tool_on_a_full_disk(tmp_path, monkeypatch, cifar10_root,
                                   tiny_cifar_cfg, repo_root):
    """tools/train.py (in process): the first checkpoint hits a full disk:
    one line naming it, and the fresh work_dir is gone."""
    import runpy

    monkeypatch.chdir(repo_root)

    def enospc(tmp, data):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(checkpoint_save, '_write_bytes', enospc)
    work = tmp_path / 'work'
    argv = ['tools/train.py'] + tiny_cifar_cfg(
        work, cifar10_root, max_epochs=1) + ['train_cfg.val_interval=5']
    monkeypatch.setattr(sys, 'argv', [str(a) for a in argv])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as info:
            runpy.run_path('tools/train.py', run_name='__main__')
    finally:
        torch.set_num_threads(before)
    msg = str(info.value.code)
    assert '\n' not in msg
    assert msg.startswith(f'error: {work}/epoch_1.pth: no space left')
    assert not work.exists()


# ------------------------------------------------------------ reading --
class _Payload:
    """Appends a line to ``marker`` when unpickled: code from the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f'open({self.marker!r}, "a").write("ran\\n")', ))


def _runs(marker):
    return open(marker).read().count('ran') if osp.exists(marker) else 0


needs_allow_list = pytest.mark.skipif(
    not compat.SAFE_GLOBALS_USABLE,
    reason='torch<2.6 cannot allow-list mmengine types: trusted by default')


@needs_allow_list
def test_payload_does_not_run_by_default(tmp_path):
    marker, path = str(tmp_path / 'ran'), tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'x': _Payload(marker)}, path)
    with pytest.raises(checkpoint_load.CheckpointNotTrusted) as info:
        checkpoint_load.load_checkpoint_file(str(path))
    msg = str(info.value)
    assert '\n' not in msg and str(path) in msg
    assert re.search(r'it needs (builtins\.)?exec,', msg), msg
    assert 'GMPQ_MM_TRUST_CHECKPOINTS=1 if you trust' in msg
    assert _runs(marker) == 0


def test_trusted_file_is_unpickled_once(tmp_path, monkeypatch):
    marker, path = str(tmp_path / 'ran'), tmp_path / 'trusted.pth'
    torch.save({'state_dict': {}, 'x': _Payload(marker)}, path)
    monkeypatch.setenv(checkpoint_load.TRUST_ENV, 'yes')
    checkpoint_load.load_checkpoint_file(str(path))
    assert _runs(marker) == 1


def test_mmengine_loading_is_safe_too(tmp_path):
    """init_cfg / load_from reach the file through mmengine's loader."""
    from mmengine.runner.checkpoint import _load_checkpoint

    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    marker, path = str(tmp_path / 'ran'), tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'x': _Payload(marker)}, path)
    if compat.SAFE_GLOBALS_USABLE:
        with pytest.raises(checkpoint_load.CheckpointNotTrusted):
            _load_checkpoint(str(path), map_location='cpu')
        assert _runs(marker) == 0


@pytest.mark.parametrize('trust', ['0', '1'])
def test_a_plain_pickle_is_named_and_never_unpickled(tmp_path, monkeypatch,
                                                     trust):
    monkeypatch.setenv(checkpoint_load.TRUST_ENV, trust)
    marker = str(tmp_path / 'ran')
    evil, plain = tmp_path / 'evil.pkl', tmp_path / 'plain.pkl'
    evil.write_bytes(pickle.dumps({'state_dict': _Payload(marker)}))
    plain.write_bytes(pickle.dumps({'state_dict': {'w': [1.0, 2.0]}}))
    with pytest.raises(checkpoint_load.UnreadableCheckpoint) as info:
        checkpoint_load.load_checkpoint_file(str(evil))
    assert str(info.value) == (
        f'{evil}: a Python pickle (not a PyTorch checkpoint) that needs '
        'builtins.exec; not unpickled. Give a file written by torch.save '
        '(an OpenMMLab checkpoint)')
    assert _runs(marker) == 0
    with pytest.raises(
            checkpoint_load.UnreadableCheckpoint,
            match='a Python pickle of a dict'):
        checkpoint_load.load_checkpoint_file(str(plain))


def test_old_torch_save_format_still_loads(tmp_path):
    path = tmp_path / 'legacy.pth'
    torch.save({'state_dict': {
        'w': torch.arange(4.)
    }},
               path,
               _use_new_zipfile_serialization=False)
    ckpt = checkpoint_load.load_checkpoint_file(str(path))
    assert torch.equal(ckpt['state_dict']['w'], torch.arange(4.))


def _weights():
    return OrderedDict([('backbone.conv1.weight', torch.randn(4, 3, 3, 3)),
                        ('backbone.bn1.running_mean', torch.zeros(4)),
                        ('backbone.bn1.num_batches_tracked', torch.tensor(7)),
                        ('head.fc.weight', torch.randn(3, 4))])


# What OpenMMLab's published ImageNet weights hold: mmcls 0.x
# (tools/publish_model.py of mmcv's runner) and mmpretrain 1.x (mmengine's
# Runner, then publish_model which drops optimizer and message_hub).
PUBLISHED = {
    'mmcls_0x': {
        'meta': {
            'mmcls_version': '0.15.0',
            'env_info': 'sys.platform: linux\nPython: 3.7.10',
            'config': "model = dict(type='ImageClassifier')",
            'seed': 0,
            'exp_name': 'resnet18_b32x8_imagenet.py',
            'epoch': 100,
            'iter': 500400,
            'CLASSES': list(CLASSES),
            'hook_msgs': {
                'last_ckpt': 'work_dirs/epoch_100.pth',
                'best_score': np.float64(69.9)
            },
            'time': 'Tue Aug 31 10:00:00 2021'
        }
    },
    'mmpretrain_1x': {
        'meta': {
            'cfg': "model = dict(type='ImageClassifier')",
            'seed': 1234,
            'experiment_name': 'resnet18_8xb32_in1k_20230101',
            'time': '20230101_000000',
            'mmengine_version': '0.7.0',
            'epoch': 100,
            'iter': 500400,
            'dataset_meta': {
                'classes': CLASSES,
                'categories': [{
                    'id': 0
                }]
            }
        }
    },
}


@pytest.mark.parametrize('layout', sorted(PUBLISHED))
def test_published_imagenet_layouts_load_safely(tmp_path, monkeypatch, layout):
    monkeypatch.setenv(checkpoint_load.TRUST_ENV, '0')
    path = tmp_path / f'{layout}.pth'
    weights = _weights()
    torch.save(dict(state_dict=weights, **PUBLISHED[layout]), path)
    if not compat.SAFE_GLOBALS_USABLE and layout == 'mmcls_0x':
        # numpy scalars need the allow-list (torch>=2.6).
        with pytest.raises(
                checkpoint_load.CheckpointNotTrusted, match='torch>=2.6'):
            checkpoint_load.load_checkpoint_file(str(path))
        return
    ckpt = checkpoint_load.load_checkpoint_file(str(path))
    for key, value in weights.items():
        assert torch.equal(ckpt['state_dict'][key], value), key
    assert ckpt['meta'] == PUBLISHED[layout]['meta']


def test_a_bare_state_dict_loads_safely(tmp_path, monkeypatch):
    """torchvision-style files: an OrderedDict of tensors, nothing else."""
    monkeypatch.setenv(checkpoint_load.TRUST_ENV, '0')
    path = tmp_path / 'resnet18-f37072fd.pth'
    torch.save(_weights(), path)
    assert list(checkpoint_load.load_checkpoint_file(str(path))) == list(
        _weights())


def test_strict_switch_is_deprecated_but_kept(tmp_path, monkeypatch):
    monkeypatch.setenv(checkpoint_load.STRICT_LOAD_ENV, '1')
    assert checkpoint_load.trust_checkpoints() is False
    monkeypatch.setenv(checkpoint_load.TRUST_ENV, '1')
    with pytest.raises(ValueError, match='contradict'):
        checkpoint_load.trust_checkpoints()


def test_offline_download_is_one_line_naming_the_key(tmp_path, monkeypatch):
    from mmengine.config import Config

    from gmpq_mm.utils.cli import fail_in_one_line

    url = 'https://download.openmmlab.com/mmclassification/v0/resnet/' \
        'resnet18_8xb32_in1k_20210831-fbbb1da6.pth'

    def offline(src, dst, progress=True):
        from urllib.error import URLError
        raise URLError('[Errno -3] Temporary failure in name resolution')

    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    cfg = Config(
        dict(
            model=dict(
                backbone=dict(
                    backbone=dict(
                        init_cfg=dict(type='Pretrained', checkpoint=url))))))
    with pytest.raises(SystemExit) as info:
        with fail_in_one_line(cfg):
            checkpoint_load._load_http(url, model_dir=str(tmp_path))
    msg = str(info.value.code)
    assert '\n' not in msg
    assert msg.startswith(f'error: cannot download {url} (URLError: ')
    assert 'name resolution' in msg
    key = 'model.backbone.backbone.init_cfg.checkpoint'
    assert f'--cfg-options {key}=/path/to/file.pth' in msg
    assert str(tmp_path / osp.basename(url)) in msg


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 1 MB tmpfs (root only; skipped where it cannot be mounted)."""
    folder = tmp_path / 'tmpfs'
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs',
         str(folder)],
        capture_output=True).returncode == 0
    if not mounted:
        pytest.skip('cannot mount a tmpfs here (needs root)')
    yield folder
    subprocess.run(['umount', str(folder)], check=True)


def test_a_real_full_disk(tiny_tmpfs):
    small = tiny_tmpfs / 'epoch_1.pth'
    checkpoint_save.save_checkpoint_atomic(
        {'state_dict': {
            'w': torch.zeros(1000)
        }}, str(small))
    big = {'state_dict': {'w': torch.zeros(500_000)}}  # 2 MB
    with pytest.raises(
            checkpoint_save.CheckpointWriteError,
            match=r'epoch_2.pth: no space left .* needs 1.9 MB'):
        checkpoint_save.save_checkpoint_atomic(big,
                                               str(tiny_tmpfs / 'epoch_2.pth'))
    assert os.listdir(tiny_tmpfs) == ['epoch_1.pth']
    checkpoint_load.load_checkpoint_file(str(small))  # still whole


def test_read_once_window(tmp_path, monkeypatch):
    """A finetune reads its FP weights for init_cfg and again to check them
    (CalibrationHook): inside the window, one unpickling."""
    monkeypatch.setenv(checkpoint_load.TRUST_ENV, '1')
    marker, path = str(tmp_path / 'ran'), tmp_path / 'trusted.pth'
    torch.save({
        'state_dict': {
            'w': torch.ones(1)
        },
        'x': _Payload(marker)
    }, path)
    window = checkpoint_load.ReadOnce().start()
    first = checkpoint_load.load_checkpoint_file(str(path), 'cpu')
    again = checkpoint_load.load_checkpoint_file(str(path), 'cpu')
    assert again is first and _runs(marker) == 1
    window.stop()
    checkpoint_load.load_checkpoint_file(str(path), 'cpu')
    assert _runs(marker) == 2  # outside the window: read afresh


def test_read_once_window_left_open_ends_with_its_owner(tmp_path, monkeypatch):
    """A run that fails between the hook's start and stop drops its hook;
    the window it left open must not serve (possibly changed) objects to
    later loads in the same process."""
    import gc
    monkeypatch.setenv(checkpoint_load.TRUST_ENV, '1')
    marker, path = str(tmp_path / 'ran'), tmp_path / 'trusted.pth'
    torch.save({
        'state_dict': {
            'w': torch.ones(1)
        },
        'x': _Payload(marker)
    }, path)
    window = checkpoint_load.ReadOnce().start()
    first = checkpoint_load.load_checkpoint_file(str(path), 'cpu')
    del window  # never stopped: the failed run's hook is gone
    gc.collect()
    again = checkpoint_load.load_checkpoint_file(str(path), 'cpu')
    assert again is not first and _runs(marker) == 2
    fresh = checkpoint_load.ReadOnce().start()  # a new run opens its own
    one = checkpoint_load.load_checkpoint_file(str(path), 'cpu')
    assert checkpoint_load.load_checkpoint_file(str(path), 'cpu') is one
    fresh.stop()
