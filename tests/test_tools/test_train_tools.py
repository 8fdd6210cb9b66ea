"""End-to-end runs of tools/train.py, tools/test.py and tools/dist_train.sh.

Every run is a subprocess on the tiny datasets of ``tests/conftest.py``
(ResNet-18 at 8..64 channels, 40 CIFAR images): the training itself takes a
second or two, most of each run is importing torch / mmpretrain.
"""
import importlib.util
import json
import os.path as osp
import pickle
import re
import shutil
import time

import pytest
import torch

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

CONFIG = 'configs/gmpq/pretrain_r18_cifar10.py'
# 40 train images (5 batch files x 8) at batch size 4.
ITERS_PER_EPOCH = 10


def _train_epochs(output):
    """Epoch numbers that ran training iterations, in order of appearance."""
    return sorted(
        {int(e)
         for e in re.findall(r'Epoch\(train\)\s*\[(\d+)\]', output)})


def _last_iter_of_epoch(output, epoch):
    found = re.findall(rf'Epoch\(train\)\s*\[{epoch}\]\[\s*(\d+)/(\d+)\]',
                       output)
    assert found, f'no training log for epoch {epoch}'
    return found[-1]


def _copy_work_dir(src, dst):
    """Copy a finished work_dir; point ``last_checkpoint`` into the copy."""
    shutil.copytree(src, dst)
    with open(osp.join(dst, 'last_checkpoint')) as f:
        last = f.read().strip()
    with open(osp.join(dst, 'last_checkpoint'), 'w') as f:
        f.write(osp.join(str(dst), osp.basename(last)))
    return dst


def _load_tool(name):
    """Import tools/<name>.py as a module (for in-process argument tests)."""
    spec = importlib.util.spec_from_file_location(
        f'gmpq_tools_{name}', osp.join(REPO_ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------ train.py --
def test_train_two_epochs(trained_cifar_r18):
    work_dir = trained_cifar_r18
    output = (work_dir / 'train_output.txt').read_text()
    for name in ('epoch_1.pth', 'epoch_2.pth', 'last_checkpoint'):
        assert (work_dir / name).is_file(), name
    assert (work_dir /
            'last_checkpoint').read_text().strip().endswith('epoch_2.pth')
    assert _train_epochs(output) == [1, 2]
    assert _last_iter_of_epoch(output, 1) == (str(ITERS_PER_EPOCH),
                                              str(ITERS_PER_EPOCH))
    # Validation ran every epoch and reported a sane accuracy.
    accs = [float(a) for a in re.findall(r'accuracy/top1: ([\d.]+)', output)]
    assert len(accs) == 2 and all(0 <= a <= 100 for a in accs)
    # The shrunk model really was used (the options reached the config).
    ckpt = torch.load(
        work_dir / 'epoch_2.pth', map_location='cpu', weights_only=False)
    assert ckpt['meta']['epoch'] == 2
    assert ckpt['state_dict']['head.fc.weight'].shape == (10, 64)
    # The md5 mismatch of the tiny CIFAR files is a warning, not an error.
    assert 'differ from the official release' in output


def test_resume_auto(trained_cifar_r18, cifar10_root, tmp_path, run_tool,
                     tiny_cifar_cfg):
    work_dir = _copy_work_dir(trained_cifar_r18, tmp_path / 'wd')
    result = run_tool(['tools/train.py'] +
                      tiny_cifar_cfg(work_dir, cifar10_root, max_epochs=3) +
                      ['--resume'])
    out = result.output
    assert 'Auto resumed from the latest checkpoint' in out, result.tail()
    assert f'{osp.join(str(work_dir), "epoch_2.pth")}' in out
    assert 'resumed epoch: 2, iter: 20' in out, result.tail()
    assert _train_epochs(out) == [3], 'epochs 1-2 must not be retrained'
    assert (work_dir / 'epoch_3.pth').is_file()
    ckpt = torch.load(
        work_dir / 'epoch_3.pth', map_location='cpu', weights_only=False)
    assert ckpt['meta']['epoch'] == 3
    assert ckpt['meta']['iter'] == 3 * ITERS_PER_EPOCH


@pytest.mark.slow
def test_resume_from_path(trained_cifar_r18, cifar10_root, tmp_path, run_tool,
                          tiny_cifar_cfg):
    """``--resume PATH`` resumes from that file, not from last_checkpoint."""
    work_dir = tmp_path / 'wd'
    ckpt = trained_cifar_r18 / 'epoch_1.pth'
    result = run_tool(['tools/train.py'] +
                      tiny_cifar_cfg(work_dir, cifar10_root, max_epochs=2) +
                      ['--resume', str(ckpt)])
    out = result.output
    assert 'Auto resumed' not in out
    assert 'resumed epoch: 1, iter: 10' in out, result.tail()
    assert _train_epochs(out) == [2]
    assert (work_dir / 'epoch_2.pth').is_file()
    assert not (work_dir / 'epoch_1.pth').exists()


def test_load_from_starts_fresh(trained_cifar_r18, cifar10_root, tmp_path,
                                run_tool, tiny_cifar_cfg):
    """``load_from`` takes the weights only: training restarts at epoch 1."""
    work_dir = tmp_path / 'wd'
    ckpt = trained_cifar_r18 / 'epoch_2.pth'
    result = run_tool(['tools/train.py'] +
                      tiny_cifar_cfg(work_dir, cifar10_root, max_epochs=1) +
                      [f'load_from={ckpt}'])
    out = result.output
    assert f'Load checkpoint from {ckpt}' in out, result.tail()
    assert 'resumed epoch' not in out
    assert _train_epochs(out) == [1]
    saved = torch.load(
        work_dir / 'epoch_1.pth', map_location='cpu', weights_only=False)
    assert saved['meta']['epoch'] == 1
    assert saved['meta']['iter'] == ITERS_PER_EPOCH


# ------------------------------------------------------------- test.py --
def _wait_for_report_module(timeout=300):
    """tools/test.py needs gmpq_mm.utils.report (written concurrently)."""
    path = osp.join(REPO_ROOT, 'gmpq_mm', 'utils', 'report.py')
    deadline = time.time() + timeout
    while not osp.isfile(path):
        if time.time() > deadline:
            pytest.fail(f'{path} does not exist (tools/test.py imports it)')
        time.sleep(10)


def test_test_tool_writes_metrics(trained_cifar_r18, cifar10_root, tmp_path,
                                  run_tool, tiny_cifar_options):
    _wait_for_report_module()
    ckpt = trained_cifar_r18 / 'epoch_2.pth'
    out_json = tmp_path / 'out' / 'result.json'
    result = run_tool([
        'tools/test.py', CONFIG, ckpt, '--work-dir', tmp_path /
        'wd', '--out', out_json, '--cfg-options'
    ] + tiny_cifar_options(cifar10_root))
    out = result.output
    assert f'Load checkpoint from {ckpt}' in out
    top1 = re.findall(r'Epoch\(test\).*accuracy/top1: ([\d.]+)', out)
    assert top1, result.tail()
    report = json.loads(out_json.read_text())
    assert report['checkpoint'] == str(ckpt)
    assert report['config'] == CONFIG
    acc = report['metrics']['accuracy/top1']
    assert 0 <= acc <= 100
    assert acc == pytest.approx(float(top1[-1]), abs=1e-3)
    # Same weights, same test split: test.py reproduces the last validation.
    train_out = (trained_cifar_r18 / 'train_output.txt').read_text()
    last_val = re.findall(r'Epoch\(val\).*accuracy/top1: ([\d.]+)',
                          train_out)[-1]
    assert acc == pytest.approx(float(last_val), abs=1e-3)


# ------------------------------------------------------ checkpoint loading --
class NotAllowListed:
    """A Python object that ``weights_only`` unpickling must not accept."""

    def __init__(self, value=1):
        self.value = value


def test_plain_torch_load_of_mmengine_checkpoint(trained_cifar_r18,
                                                 record_property):
    """Records whether torch's default (weights_only) loader accepts an
    mmengine checkpoint; the tools must work either way (see the resume and
    load_from tests), which is what gmpq_mm.engine.checkpoint_load is for."""
    try:
        torch.load(trained_cifar_r18 / 'epoch_2.pth', map_location='cpu')
        outcome = 'loads'
    except pickle.UnpicklingError as err:
        outcome = f'fails: {str(err).splitlines()[-3:]}'
    record_property('plain_torch_load', outcome)
    print(f'plain torch.load(mmengine checkpoint): {outcome}')


def test_load_checkpoint_file(trained_cifar_r18, monkeypatch):
    from gmpq_mm.engine.checkpoint_load import load_checkpoint_file
    monkeypatch.delenv('GMPQ_MM_STRICT_LOAD', raising=False)
    ckpt = load_checkpoint_file(
        str(trained_cifar_r18 / 'epoch_2.pth'), map_location='cpu')
    assert ckpt['meta']['epoch'] == 2
    assert 'head.fc.weight' in ckpt['state_dict']
    assert 'message_hub' in ckpt and 'optimizer' in ckpt
    with pytest.raises(FileNotFoundError, match='no_such.pth'):
        load_checkpoint_file(str(trained_cifar_r18 / 'no_such.pth'))


def test_mmengine_loader_is_patched(trained_cifar_r18):
    """mmengine's own loading goes through gmpq_mm's once registered."""
    from mmengine.runner.checkpoint import CheckpointLoader, _load_checkpoint

    from gmpq_mm.engine import checkpoint_load
    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    assert CheckpointLoader._schemes[''] is checkpoint_load._load_local
    ckpt = _load_checkpoint(
        str(trained_cifar_r18 / 'epoch_1.pth'), map_location='cpu')
    assert ckpt['meta']['epoch'] == 1


def test_foreign_objects_need_the_trust_switch(tmp_path, monkeypatch):
    from gmpq_mm.engine import checkpoint_load
    path = tmp_path / 'foreign.pth'
    torch.save({
        'state_dict': {
            'w': torch.ones(2)
        },
        'extra': NotAllowListed(3)
    }, path)
    monkeypatch.delenv('GMPQ_MM_STRICT_LOAD', raising=False)
    monkeypatch.setenv('GMPQ_MM_TRUST_CHECKPOINTS', '0')
    with pytest.raises(checkpoint_load.CheckpointNotTrusted) as info:
        checkpoint_load.load_checkpoint_file(str(path))
    msg = str(info.value)
    assert '\n' not in msg and str(path) in msg
    assert 'NotAllowListed' in msg and 'GMPQ_MM_TRUST_CHECKPOINTS=1' in msg
    # Trusted: loads.
    monkeypatch.setenv('GMPQ_MM_TRUST_CHECKPOINTS', '1')
    ckpt = checkpoint_load.load_checkpoint_file(str(path))
    assert isinstance(ckpt['extra'], NotAllowListed)
    assert ckpt['extra'].value == 3


def test_safe_load_accepts_tensor_only_checkpoint(tmp_path, monkeypatch):
    from gmpq_mm.engine import checkpoint_load
    path = tmp_path / 'weights.pth'
    torch.save({
        'state_dict': {
            'w': torch.arange(3.)
        },
        'meta': {
            'epoch': 1
        }
    }, path)
    monkeypatch.setenv('GMPQ_MM_TRUST_CHECKPOINTS', '0')
    ckpt = checkpoint_load.load_checkpoint_file(str(path))
    assert torch.equal(ckpt['state_dict']['w'], torch.arange(3.))


def test_safe_load_accepts_mmengine_checkpoint(trained_cifar_r18, monkeypatch):
    """Safe loading of a full mmengine checkpoint needs torch>=2.6 (the
    restricted getattr); older torch refuses it when trust is off, saying
    so."""
    from gmpq_mm import compat
    from gmpq_mm.engine import checkpoint_load
    monkeypatch.setenv('GMPQ_MM_TRUST_CHECKPOINTS', '0')
    path = str(trained_cifar_r18 / 'epoch_2.pth')
    if not compat.SAFE_GLOBALS_USABLE:
        with pytest.raises(pickle.UnpicklingError, match='torch>=2.6'):
            checkpoint_load.load_checkpoint_file(path, map_location='cpu')
        return
    ckpt = checkpoint_load.load_checkpoint_file(path, map_location='cpu')
    assert ckpt['meta']['epoch'] == 2
    assert 'message_hub' in ckpt


class _Payload:
    """Pickles as ``getattr(HistoryBuffer, 'register_statistics')``: a
    look-up outside the allowed statistics, which must be refused."""

    def __reduce__(self):
        from mmengine.logging import HistoryBuffer
        return getattr, (HistoryBuffer, 'register_statistics')


def test_strict_load_refuses_other_getattr(tmp_path, monkeypatch):
    import torch

    from gmpq_mm.engine import checkpoint_load
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'x': _Payload()}, path)
    monkeypatch.setenv('GMPQ_MM_STRICT_LOAD', '1')  # the deprecated switch
    with pytest.raises(pickle.UnpicklingError, match='evil.pth'):
        checkpoint_load.load_checkpoint_file(str(path))


# ------------------------------------------------------- dist_train.sh --
def test_dist_train_two_processes_gloo(cifar10_root, tmp_path, run_tool,
                                       tiny_cifar_cfg, free_tcp_port):
    work_dir = tmp_path / 'wd'
    result = run_tool(
        ['tools/dist_train.sh', CONFIG, '2'] +
        tiny_cifar_cfg(work_dir, cifar10_root, max_epochs=1)[1:],
        env={'PORT': free_tcp_port},
        timeout=400)
    out = result.output
    assert 'Distributed launcher: pytorch' in out, result.tail()
    assert 'Distributed training: True' in out
    # The DistributedSampler splits the 40 images over 2 ranks: 5 iterations
    # of batch 4 per rank instead of 10.
    assert _last_iter_of_epoch(out, 1) == ('5', '5'), result.tail()
    assert re.search(r'Epoch\(val\).*accuracy/top1', out)
    assert (work_dir / 'epoch_1.pth').is_file()


# ----------------------------------------------------- ImageNet folders --
IMAGENET_CONFIG = """\
_base_ = [
    {runtime!r},
    'mmpretrain::_base_/models/resnet18.py',
]
model = dict(
    backbone=dict(stem_channels=8, base_channels=8),
    head=dict(num_classes={num_classes}, in_channels=64, topk=(1, )))
data_preprocessor = dict(
    num_classes={num_classes},
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    to_rgb=True)
train_dataloader = dict(
    batch_size=4, num_workers=0, dataset={train!r},
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=4, num_workers=0, dataset={val!r},
    sampler=dict(type='DefaultSampler', shuffle=False))
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9))
train_cfg = dict(by_epoch=True, max_epochs=1, val_interval=1)
val_cfg = dict()
test_cfg = dict()
default_hooks = dict(logger=dict(interval=1))
randomness = dict(seed=0)
"""


@pytest.fixture
def write_imagenet_config(imagenet_classes, imagenet_dataset_cfg):
    """``write(path, data_root)``: a tiny mmpretrain ResNet-18 config
    (ImageNet stem, 8..64 channels) on an ImageNet-style folder."""

    def write(path, data_root):
        path.write_text(
            IMAGENET_CONFIG.format(
                runtime=osp.join(REPO_ROOT,
                                 'configs/gmpq/_base_/default_runtime.py'),
                num_classes=len(imagenet_classes),
                train=imagenet_dataset_cfg(data_root, 'train'),
                val=imagenet_dataset_cfg(data_root, 'val')))
        return path

    return write


def test_train_imagenet_folder(imagenet_root, tmp_path, run_tool,
                               write_imagenet_config):
    config = write_imagenet_config(tmp_path / 'r18_imagenet_tiny.py',
                                   imagenet_root)
    work_dir = tmp_path / 'wd'
    result = run_tool(['tools/train.py', config, '--work-dir', work_dir])
    out = result.output
    # 3 classes x 4 images at batch 4: 3 iterations, then validation.
    assert _last_iter_of_epoch(out, 1) == ('3', '3'), result.tail()
    assert re.search(r'Epoch\(val\).*accuracy/top1', out)
    assert (work_dir / 'epoch_1.pth').is_file()


# ------------------------------------------------------------ bad input --
@pytest.fixture
def train_tool(monkeypatch):
    """tools/train.py as a module; its LOCAL_RANK default is undone."""
    monkeypatch.setenv('LOCAL_RANK', '0')
    return _load_tool('train')


def _fail_fast(train_tool, argv, work_dir):
    """Run train.main in-process; it must exit with an error message
    before building anything (well under 10 s, no checkpoint written)."""
    start = time.time()
    with pytest.raises(SystemExit) as info:
        train_tool.main([str(a) for a in argv])
    elapsed = time.time() - start
    message = str(info.value.code)
    assert message.startswith('error: '), message
    assert elapsed < 10, f'took {elapsed:.1f}s to fail'
    assert not list(work_dir.glob('**/*.pth'))
    return message


@pytest.mark.parametrize('argv, resume, load_from', [
    ([], False, None),
    (['--resume'], True, None),
    (['--resume', 'work_dirs/x/epoch_3.pth'], True, 'work_dirs/x/epoch_3.pth'),
    (['--cfg-options', 'load_from=a.pth'], False, 'a.pth'),
])
def test_resume_arguments(train_tool, argv, resume, load_from):
    """mmpretrain's rules: ``--resume`` alone = auto (latest in work_dir,
    load_from dropped), ``--resume PATH`` = resume from PATH."""
    from mmengine.config import Config
    args = train_tool.parse_args([CONFIG] + argv)
    cfg = train_tool.merge_args(
        Config.fromfile(osp.join(REPO_ROOT, CONFIG)), args)
    assert cfg.resume is resume
    assert cfg.load_from == load_from
    assert cfg.work_dir == osp.join('./work_dirs', 'pretrain_r18_cifar10')
    assert cfg.launcher == 'none'


def test_missing_data_root_fails_fast(train_tool, tmp_path, tiny_cifar_cfg):
    missing = tmp_path / 'no_such_cifar'
    work_dir = tmp_path / 'wd'
    # CIFAR types with download=True (the default) may fetch a missing
    # data_root, so the offline case is download=False.
    argv = tiny_cifar_cfg(work_dir, missing) + [
        f'{p}_dataloader.dataset.download=False' for p in ('train', 'val')
    ]
    message = _fail_fast(train_tool, argv, work_dir)
    assert f'train_dataloader.dataset.data_root: {missing}' in message
    assert f'val_dataloader.dataset.data_root: {missing}' in message
    assert not work_dir.exists()
    assert not missing.exists()


def test_missing_imagenet_folder_fails_fast(train_tool, tmp_path,
                                            imagenet_root,
                                            write_imagenet_config):
    config = write_imagenet_config(tmp_path / 'cfg.py', imagenet_root)
    missing = tmp_path / 'no_such_imagenet'
    work_dir = tmp_path / 'wd'
    message = _fail_fast(train_tool, [
        config, '--work-dir', work_dir, '--cfg-options',
        f'train_dataloader.dataset.data_root={missing}'
    ], work_dir)
    assert str(missing) in message
    assert 'val_dataloader' not in message


def test_missing_load_from_fails_fast(train_tool, tmp_path, cifar10_root,
                                      tiny_cifar_cfg):
    missing = tmp_path / 'nowhere' / 'epoch_9.pth'
    work_dir = tmp_path / 'wd'
    message = _fail_fast(
        train_tool,
        tiny_cifar_cfg(work_dir, cifar10_root) + [f'load_from={missing}'],
        work_dir)
    assert f'load_from: {missing}' in message
    assert not work_dir.exists()


def test_missing_resume_path_fails_fast(train_tool, tmp_path, cifar10_root,
                                        tiny_cifar_cfg):
    missing = tmp_path / 'epoch_9.pth'
    work_dir = tmp_path / 'wd'
    message = _fail_fast(
        train_tool,
        tiny_cifar_cfg(work_dir, cifar10_root) + ['--resume', missing],
        work_dir)
    assert str(missing) in message


@pytest.mark.slow
def test_bad_paths_cli_exit_status(tmp_path, run_tool, tiny_cifar_cfg):
    """The real command line: nonzero exit, every bad path named, no
    traceback, and nothing built (no Runner environment dump, no work_dir)."""
    work_dir = tmp_path / 'wd'
    missing_ckpt = tmp_path / 'missing.pth'
    missing_root = tmp_path / 'no_such_cifar'
    result = run_tool(
        ['tools/train.py'] + tiny_cifar_cfg(work_dir, missing_root) + [
            'train_dataloader.dataset.download=False',
            'val_dataloader.dataset.download=False',
            f'load_from={missing_ckpt}'
        ],
        check=False,
        timeout=120)
    assert result.returncode != 0
    assert str(missing_ckpt) in result.output
    assert str(missing_root) in result.output
    assert 'Traceback' not in result.output, result.tail()
    assert 'System environment' not in result.output
    assert not work_dir.exists()


@pytest.mark.parametrize('config, subs', [
    ('configs/gmpq/search_r18_cifar10.py', ('weights', 'arch')),
    (CONFIG, ()),
])
def test_amp_turns_every_optimizer_wrapper_amp(train_tool, config, subs):
    """``--amp`` on a search config makes both the weights and the arch
    wrappers AmpOptimWrapper (the constructor still gets exactly those two
    keys); a plain config changes its one wrapper."""
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(REPO_ROOT, config))
    train_tool.enable_amp(cfg.optim_wrapper)
    if subs:
        assert cfg.optim_wrapper.constructor == 'SearchOptimWrapperConstructor'
        assert 'type' not in cfg.optim_wrapper
        for key in subs:
            assert cfg.optim_wrapper[key].type == 'AmpOptimWrapper'
            assert cfg.optim_wrapper[key].loss_scale == 'dynamic'
    else:
        assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
