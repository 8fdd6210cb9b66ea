"""A search or a training run resumed from a checkpoint ends bit for bit
where the uninterrupted run ends, with random crops and flips in the
pipeline, whatever the loader settings (num_workers 0 / 2, persistent
workers on / off), and whether it stopped at an epoch's end or in the
middle of one.

Runners are built in this process (a run is stopped by a hook raising at
a chosen iteration, as a crash would); one test kills a real
``tools/train.py`` process with SIGKILL in the middle of an epoch.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tool_env, write_search_configs  # one conftest.py

RANDOM_PIPELINE = ("[dict(type='RandomCrop', crop_size=32, padding=4), "
                   "dict(type='RandomFlip', prob=0.5, direction='horizontal'),"
                   " dict(type='PackInputs')]")
# (num_workers, persistent_workers); persistent workers are the kill -9
# test's and the mid-epoch checkpoint test's setting.
LOADER_SETTINGS = [(0, False), (2, False)]


class _Crash(Exception):
    """Stands for the run dying at a chosen iteration."""


def _crash_hook(at_iter):
    from mmengine.hooks import Hook

    class CrashAt(Hook):

        def after_train_iter(self,
                             runner,
                             batch_idx,
                             data_batch=None,
                             outputs=None):
            if runner.iter + 1 == at_iter:
                raise _Crash(at_iter)

    return CrashAt()


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One intra-op thread, as the tools' subprocesses run here (results
    are compared bit for bit, and the thread count changes the sums'
    order); also 8x faster on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope='module')
def search_cfg(tmp_path_factory, repo_root, cifar10_root):
    """A tiny bilevel search config with random crop + flip, and a teacher
    checkpoint of random weights (the search only needs one that fits)."""
    from mmengine.config import Config
    from mmpretrain.registry import MODELS

    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    folder = tmp_path_factory.mktemp('exact_resume')
    teacher_ckpt = folder / 'teacher.pth'
    cfg = write_search_configs(
        folder,
        repo_root,
        cifar10_root,
        teacher_ckpt,
        extra_text='train_dataloader = dict(batch_size=8, num_workers=0, '
        f"persistent_workers=False, dataset=dict(data_root='{cifar10_root}', "
        f'pipeline={RANDOM_PIPELINE}))')
    teacher = Config.fromfile(folder / 'teacher.py').model
    torch.manual_seed(0)
    torch.save({'state_dict': MODELS.build(teacher).state_dict()},
               teacher_ckpt)
    return cfg


def run(cfg_file,
        work_dir,
        workers=0,
        persistent=False,
        crash_at=None,
        resume_from=None,
        **options):
    """Train ``cfg_file`` in this process as tools/train.py would; returns
    the final state dict (None when it crashed as told)."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    from gmpq_mm.engine.hooks import add_exact_resume
    from gmpq_mm.utils.bit_record import add_bit_record_hook
    cfg = Config.fromfile(cfg_file)
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f'{os.path.basename(work_dir)}_{time.time_ns()}'
    cfg.train_dataloader.update(
        num_workers=workers, persistent_workers=persistent)
    cfg.env_cfg = dict(mp_cfg=dict(mp_start_method='fork'))
    cfg.merge_from_dict(options)
    if resume_from is not None:
        cfg.resume, cfg.load_from = True, str(resume_from)
    add_bit_record_hook(cfg)
    add_exact_resume(cfg)
    runner = Runner.from_cfg(cfg)
    if crash_at is not None:
        runner.register_hook(_crash_hook(crash_at), priority='LOWEST')
        with pytest.raises(_Crash):
            runner.train()
        return None
    model = runner.train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f'{len(different)} of {len(a)} differ, e.g. ' \
        f'{different[:3]}'


@pytest.fixture(scope='module')
def straight(search_cfg, tmp_path_factory):
    """The uninterrupted 2-epoch search (num_workers=0)."""
    return run(search_cfg, tmp_path_factory.mktemp('straight'))


def test_loader_settings_do_not_change_the_run(search_cfg, straight, tmp_path):
    # Every sample has its own random state: two workers that persist
    # draw exactly what the main process draws.
    got = run(search_cfg, tmp_path / 'w2', workers=2, persistent=True)
    assert_same(straight, got)


@pytest.mark.parametrize('workers, persistent', LOADER_SETTINGS)
def test_resume_after_a_crash_mid_epoch_is_exact(search_cfg, straight,
                                                 tmp_path, workers,
                                                 persistent):
    # 40 images, half for the alphas, batch 8: 3 iterations an epoch.
    # The run dies at iteration 5 (in epoch 2); epoch_1.pth survives.
    work = tmp_path / 'work'
    run(search_cfg, work, workers, persistent, crash_at=5)
    assert (work / 'epoch_1.pth').is_file()
    assert not (work / 'epoch_2.pth').exists()
    resumed = run(
        search_cfg,
        work,
        workers,
        persistent,
        resume_from=work / 'epoch_1.pth')
    assert_same(straight, resumed)


@pytest.mark.slow
def test_resume_from_a_checkpoint_written_mid_epoch(search_cfg, straight,
                                                    tmp_path):
    """A checkpoint every 2 iterations: iter_4.pth is one iteration into
    epoch 2, and the resumed run skips that iteration's samples (and its
    arch batch) instead of starting the epoch over."""
    work = tmp_path / 'work'
    every_2 = {
        'default_hooks.checkpoint':
        dict(type='CheckpointHook', interval=2, by_epoch=False)
    }
    run(search_cfg, work, 2, True, crash_at=5, **every_2)
    assert (work / 'iter_4.pth').is_file()
    resumed = run(
        search_cfg, work, 2, True, resume_from=work / 'iter_4.pth', **every_2)
    assert_same(straight, resumed)


def test_seeded_samples_do_not_depend_on_the_process(cifar10_root):
    """The key (seed, epoch, pass, index) alone decides a sample's crop and
    flip; the process's own random state is put back afterwards."""
    from gmpq_mm.datasets import SeededSamples
    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    data = SeededSamples(
        dict(
            type='CIFAR10Format',
            data_root=str(cifar10_root),
            pipeline=[
                dict(type='RandomCrop', crop_size=32, padding=4),
                dict(type='RandomFlip', prob=0.5),
                dict(type='PackInputs')
            ]))
    torch.manual_seed(1)
    a = data[(0, 3, 0, 5)]['inputs']
    state = torch.random.get_rng_state()
    torch.manual_seed(2)
    b = data[(0, 3, 0, 5)]['inputs']
    assert torch.equal(a, b)
    assert not torch.equal(a, data[(0, 4, 0, 5)]['inputs'])  # next epoch
    torch.manual_seed(1)
    data[(0, 3, 0, 5)]
    assert torch.equal(torch.random.get_rng_state(), state)


def _wait_for(path, pattern, proc, timeout=240):
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise AssertionError(f'the run ended early: {proc.returncode}')
        text = path.read_text() if path.exists() else ''
        if re.search(pattern, text):
            return
        time.sleep(0.2)
    raise AssertionError(f'{pattern!r} not seen in {timeout} s')


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_is_exact(search_cfg, straight, tmp_path,
                                               run_tool, repo_root):
    """A real tools/train.py run (2 persistent workers) killed with
    SIGKILL in the middle of epoch 2, then ``--resume``."""
    work = tmp_path / 'work'
    log = tmp_path / 'out.txt'
    args = [
        sys.executable, 'tools/train.py',
        str(search_cfg), '--work-dir',
        str(work), '--cfg-options', 'train_dataloader.num_workers=2',
        'train_dataloader.persistent_workers=True',
        'env_cfg.mp_cfg.mp_start_method=fork'
    ]
    with open(log, 'w') as out:
        proc = subprocess.Popen(
            args,
            cwd=str(repo_root),
            env=tool_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            _wait_for(log, r'Epoch\(train\)\s+\[2\]\[\s*1/', proc)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert (work / 'epoch_1.pth').is_file()
    assert not (work / 'epoch_2.pth').exists()
    run_tool(args[1:] + ['--resume'], timeout=400)
    from gmpq_mm.engine.checkpoint_load import load_checkpoint_file
    resumed = load_checkpoint_file(str(work / 'epoch_2.pth'))['state_dict']
    assert_same(straight, resumed)
    shutil.rmtree(work, ignore_errors=True)


def test_plain_training_resumes_exactly(tmp_path, repo_root, cifar10_root,
                                        tiny_cifar_options):
    """mmengine's own epoch loop (pretrain / finetune configs): the CIFAR
    pipeline's random crop and flip, two persistent workers, a crash in
    epoch 2, then resume."""
    from mmengine.config import DictAction
    config = repo_root / 'configs/gmpq/pretrain_r18_cifar10.py'
    options = {}
    for option in tiny_cifar_options(str(cifar10_root), batch_size=8):
        key, value = option.split('=', 1)
        if not key.startswith('train_dataloader.') or 'workers' not in key:
            options[key] = DictAction._parse_iterable(value)
    options['train_cfg.val_interval'] = 5  # no validation: faster
    straight = run(config, tmp_path / 'straight', 2, True, **options)
    work = tmp_path / 'work'
    run(config, work, 2, True, crash_at=7, **options)  # 5 an epoch
    resumed = run(
        config, work, 2, True, resume_from=work / 'epoch_1.pth', **options)
    assert_same(straight, resumed)


class _SelfCopying:
    """A dataset with its own ``__deepcopy__`` (as torch datasets and
    config objects may have)."""

    def __init__(self):
        self.copies = 0

    def __len__(self):
        return 3

    def __getitem__(self, index):
        return index

    def __deepcopy__(self, memo):
        other = _SelfCopying()
        other.copies = self.copies + 1
        return other


def test_copied_seeded_samples_stay_seeded():
    """A deep copy (mmengine's build_dataloader copies its config, dataset
    objects included) is still a SeededSamples around a copy of the
    dataset, not the bare dataset; attributes are still forwarded."""
    import copy

    from gmpq_mm.datasets import SeededSamples
    data = SeededSamples(_SelfCopying())
    twin = copy.deepcopy({'dataset': data})['dataset']
    assert type(twin) is SeededSamples
    assert twin.dataset.copies == 1 and twin.copies == 1
    assert twin[(0, 0, 0, 2)] == 2 and len(twin) == 3
    with pytest.raises(AttributeError, match='__missing_name__'):
        data.__missing_name__


def test_seed_every_sample_leaves_its_input_alone():
    """The config a caller passes in (and may reuse for another run) is
    not changed, at any depth."""
    import copy

    from gmpq_mm.datasets import seed_every_sample
    loader = dict(
        batch_size=2,
        sampler=dict(type='DefaultSampler', shuffle=True),
        dataset=dict(type='StanfordCars', data_root='x', split='train'))
    before = copy.deepcopy(loader)
    once = seed_every_sample(loader)
    twice = seed_every_sample(once)
    assert loader == before
    assert twice['dataset']['dataset'] is loader['dataset']
    assert twice['sampler']['sampler'] == before['sampler']
    assert twice['sampler']['sampler'] is not loader['sampler']
