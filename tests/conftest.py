"""Shared fixtures and helpers for the gmpq_mm test-suite.

Everything here is small and CPU-only: datasets are a few dozen images written
in the *real* on-disk formats into pytest's temporary directories, and the
tools (``tools/train.py``, ``tools/test.py``, ``tools/dist_train.sh``) run
with the user's arguments: in a subprocess (``run_tool``) where a fresh
interpreter is the point, else in this process (``run_in_process``).

Fixtures (use them by name in a test's arguments):

``repo_root``
    :class:`pathlib.Path` of the repository root (``pythonpath = .`` in
    setup.cfg puts it first on ``sys.path``, so the tests import this
    checkout's ``gmpq_mm`` even where another copy is installed).
``cifar10_root``
    session-scoped directory holding ``cifar-10-batches-py/`` (data_batch_1..5,
    test_batch, batches.meta) pickled the way the official python-version
    files are (Python 2 ``str`` keys, uint8 ``(N, 3072)`` data). Pass it as ``data_root`` of
    ``CIFAR10`` / ``CIFAR10Format``. See :func:`write_cifar10`.
``imagenet_root``
    session-scoped ImageNet-style folder (``train/<cls>/*.JPEG``,
    ``val/<cls>/*.JPEG``, ``meta/train.txt``, ``meta/val.txt``). Build dataset
    configs for it with :func:`imagenet_dataset_cfg` (fixture of the same
    name). See :func:`write_imagenet`.
``tiny_cifar_cfg``
    the :func:`tiny_cifar_cfg` helper: command-line arguments that shrink
    ``configs/gmpq/pretrain_r18_cifar10.py`` to a model and schedule that
    train in seconds on the ``cifar10_root`` data.
``run_tool``
    the :func:`run_tool` helper: run ``tools/<script>`` (or any command) in a
    subprocess from the repo root with a clean environment and a timeout;
    asserts success (showing the output tail on failure) unless told not to.
``run_in_process``
    the :func:`run_in_process` helper: the same call and result as
    ``run_tool`` for a Python tool, but its ``main(argv)`` runs in the test
    process (no 5 s of imports per run), isolated from the rest of the
    session (:func:`isolated_openmmlab_state`). Use it wherever a fresh
    interpreter is not the point; keep ``run_tool`` for torchrun / gloo,
    shell scripts, start-up and import behaviour.
``openmmlab_isolation``
    the isolation of ``run_in_process`` as a fixture, for a test that builds
    and runs an mmengine ``Runner`` itself.
``trained_cifar_r18``
    session-scoped work_dir of a 2-epoch run of the tiny CIFAR-10 ResNet-18
    (``epoch_1.pth``, ``epoch_2.pth``, ``last_checkpoint``, logs). Only built
    when a test asks for it, once per test run even under pytest-xdist
    (:func:`shared_session_folder`); treat it as read-only (copy it to
    resume).
``tiny_search``
    session-scoped: the default tiny bilevel search of
    :func:`write_search_configs` against ``trained_cifar_r18``, run once;
    ``config``, ``teacher_ckpt``, ``work_dir``, ``output``. Read-only.

Session-wide and automatic: ``mmpretrain::`` config look-ups are memoized
(a pure speed-up of ``Config.fromfile`` in the test process), and
``gmpq_mm.utils.register_all_modules()`` runs once.

Smaller ones: ``imagenet_classes``, ``tiny_cifar_options`` (the bare
``key=value`` list), ``free_tcp_port``.

The helpers are plain module-level functions as well; use the fixtures rather
than ``from conftest import ...`` (several conftest.py files would clash on
that module name).
"""
import os
import os.path as osp
import pickle
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

CIFAR10_CONFIG = 'configs/gmpq/pretrain_r18_cifar10.py'
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog',
                   'frog', 'horse', 'ship', 'truck')
IMAGENET_CLASSES = ('n01440764', 'n01443537', 'n01484850')

# One clearly different RGB colour per class, so that even a tiny network
# trained for two epochs gets a sane (better than chance) accuracy.
_PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
     [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
     [128, 128, 0], [0, 0, 128]],
    dtype=np.int16)


def class_images(labels, size=32, seed=0):
    """``(N, size, size, 3)`` uint8 images: the class colour plus noise."""
    rng = np.random.RandomState(seed)
    labels = np.asarray(labels)
    base = _PALETTE[labels % len(_PALETTE)][:, None, None, :]
    noise = rng.randint(-20, 21, size=(len(labels), size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope='session', autouse=True)
def _cached_external_config_lookup():
    """Speed-up only: memoize mmengine's ``mmpretrain::`` config look-up.

    mmengine 0.10 resolves every ``mmpretrain::...`` ``_base_`` entry by
    loading all of mmpretrain's model-index metafiles (~250 YAML files, about
    a second each time). Results are cached per (package, config) for the
    test session; parsing results are unchanged.
    """
    import copy

    try:
        from mmengine.config import utils as cfg_utils
        original = cfg_utils._get_cfg_metainfo
    except (ImportError, AttributeError):  # other mmengine: leave it be
        yield
        return
    cache = {}

    def cached(package_path, cfg_path):
        key = (package_path, cfg_path)
        if key not in cache:
            try:
                cache[key] = (True, original(package_path, cfg_path))
            except ValueError as err:  # a _base_ file: not in the index
                cache[key] = (False, err)
        found, value = cache[key]
        if not found:
            raise ValueError(*value.args)
        return copy.deepcopy(value)

    cfg_utils._get_cfg_metainfo = cached
    yield
    cfg_utils._get_cfg_metainfo = original


@pytest.fixture(scope='session', autouse=True)
def _register_all_modules_once():
    """``gmpq_mm.utils.register_all_modules()`` once for the session, so a
    test that builds a registered type works alone, in any order and on
    any xdist worker (as every tool, the registration runs before any
    build; it is idempotent). Import-floor checks run in subprocesses."""
    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    yield


# ---------------------------------------------------------------- CIFAR-10 --
class _Py2Str(bytes):
    """A Python 2 ``str``: pickled with the (SHORT_)BINSTRING opcode."""


class _Py2Pickler(pickle._Pickler):
    """Pickles :class:`_Py2Str` the way Python 2's cPickle wrote ``str``.

    The official CIFAR python files come from Python 2: their dict keys,
    ``batch_label``, ``filenames`` and ``label_names`` are py2 ``str``, which
    Python 3 reads back as ``str`` with ``encoding='latin1'`` (what torchvision
    and mmpretrain use) and as ``bytes`` with ``encoding='bytes'``.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2str(self, obj):
        data = bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack('<i', len(data)) + data)
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2str


def _dump_py2(obj, path):
    with open(path, 'wb') as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _s(text):
    return _Py2Str(text.encode('latin1'))


def write_cifar10(root, n_per_batch=8, n_test=10, seed=0):
    """Write a tiny CIFAR-10 in the official python layout under ``root``.

    ``root/cifar-10-batches-py/`` gets ``data_batch_1`` .. ``data_batch_5``
    (``n_per_batch`` images each) and ``test_batch`` (``n_test`` images), each
    a dict ``{b'batch_label', b'labels', b'data', b'filenames'}`` with
    ``data`` a uint8 ``(N, 3072)`` array (channel-major rows, as in the
    official files), plus ``batches.meta`` with ``label_names``. Labels cycle
    through the 10 classes; each class has its own colour.

    Returns:
        str: ``root`` (use it as the dataset's ``data_root``).
    """
    folder = osp.join(str(root), 'cifar-10-batches-py')
    os.makedirs(folder, exist_ok=True)
    names = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
    for i, name in enumerate(names):
        n = n_test if name == 'test_batch' else n_per_batch
        labels = [(j + i) % 10 for j in range(n)]
        images = class_images(labels, 32, seed + i)  # N, H, W, C
        data = images.transpose(0, 3, 1, 2).reshape(n, 3072)
        label = ('testing batch 1 of 1'
                 if name == 'test_batch' else f'training batch {i + 1} of 5')
        _dump_py2(
            {
                _s('batch_label'):
                _s(label),
                _s('labels'):
                labels,
                _s('data'):
                np.ascontiguousarray(data, dtype=np.uint8),
                _s('filenames'): [
                    _s(f'{CIFAR10_CLASSES[c]}_s_{i:02d}{j:04d}.png')
                    for j, c in enumerate(labels)
                ],
            }, osp.join(folder, name))
    _dump_py2(
        {
            _s('num_cases_per_batch'): n_per_batch,
            _s('label_names'): [_s(c) for c in CIFAR10_CLASSES],
            _s('num_vis'): 3072,
        }, osp.join(folder, 'batches.meta'))
    return str(root)


@pytest.fixture(scope='session')
def cifar10_root(tmp_path_factory):
    """Directory with a tiny ``cifar-10-batches-py/`` (see write_cifar10):
    40 train images (8 per batch file) and 10 test images."""
    return write_cifar10(tmp_path_factory.mktemp('cifar10'))


# ---------------------------------------------------------------- ImageNet --
def write_imagenet(root,
                   classes=IMAGENET_CLASSES,
                   n_train=4,
                   n_val=2,
                   size=32,
                   seed=0):
    """Write an ImageNet-style folder under ``root``.

    Layout (what :class:`mmpretrain.datasets.ImageNet` reads with
    ``split='train' / 'val'``, and :class:`CustomDataset` with
    ``data_prefix='train'`` and optionally ``ann_file='meta/train.txt'``)::

        root/train/<class>/<class>_<i>.JPEG
        root/val/<class>/<class>_val_<i>.JPEG
        root/meta/train.txt   # "<class>/<class>_<i>.JPEG <label>" lines
        root/meta/val.txt     # paths relative to the split folder

    Labels are the index of the class in ``classes`` (sorted folder order).

    Returns:
        str: ``root``.
    """
    from PIL import Image
    root = str(root)
    os.makedirs(osp.join(root, 'meta'), exist_ok=True)
    for split, n in (('train', n_train), ('val', n_val)):
        lines = []
        for label, cls in enumerate(classes):
            os.makedirs(osp.join(root, split, cls), exist_ok=True)
            images = class_images([label] * n, size, seed + label)
            for i, img in enumerate(images):
                stem = f'{cls}_{i}' if split == 'train' else f'{cls}_val_{i}'
                rel = f'{cls}/{stem}.JPEG'
                Image.fromarray(img).save(
                    osp.join(root, split, rel), format='JPEG', quality=95)
                lines.append(f'{rel} {label}')
        with open(osp.join(root, 'meta', f'{split}.txt'), 'w') as f:
            f.write('\n'.join(lines) + '\n')
    return root


@pytest.fixture(scope='session')
def imagenet_root(tmp_path_factory):
    """ImageNet-style folder (see write_imagenet): 3 classes, 4 train and 2
    val 32x32 JPEGs per class, with meta/train.txt and meta/val.txt."""
    return write_imagenet(tmp_path_factory.mktemp('imagenet'))


@pytest.fixture(scope='session')
def repo_root():
    """:class:`pathlib.Path` of the repository root."""
    return REPO_ROOT


IMAGENET_32PX_TRAIN_PIPELINE = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=32),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
IMAGENET_32PX_TEST_PIPELINE = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=36, edge='short'),
    dict(type='CenterCrop', crop_size=32),
    dict(type='PackInputs'),
]


def imagenet_dataset_cfg(data_root,
                         split='train',
                         pipeline=None,
                         classes=IMAGENET_CLASSES,
                         use_ann_file=True,
                         **kwargs):
    """Dataset config dict for a folder written by :func:`write_imagenet`.

    Args:
        data_root (str): The fixture's root.
        split (str): ``'train'`` or ``'val'``.
        pipeline (list[dict], optional): Defaults to the 32-pixel train or
            test pipeline (``IMAGENET_32PX_*_PIPELINE``) matching ``split``.
        classes (Sequence[str]): Class names (sets ``metainfo.classes`` so
            the dataset does not report ImageNet's 1000 categories).
        use_ann_file (bool): ``True``: read ``meta/<split>.txt``; ``False``:
            scan the class sub-folders instead.
        **kwargs: More dataset arguments.
    """
    if pipeline is None:
        pipeline = (
            IMAGENET_32PX_TRAIN_PIPELINE
            if split == 'train' else IMAGENET_32PX_TEST_PIPELINE)
    cfg = dict(
        type='ImageNet',
        data_root=str(data_root),
        data_prefix=split,
        ann_file=f'meta/{split}.txt' if use_ann_file else '',
        metainfo=dict(classes=list(classes)),
        pipeline=[dict(step) for step in pipeline])
    cfg.update(kwargs)
    return cfg


@pytest.fixture
def imagenet_classes():
    """Class (folder) names of the ``imagenet_root`` fixture, label order."""
    return IMAGENET_CLASSES


@pytest.fixture(name='imagenet_dataset_cfg')
def imagenet_dataset_cfg_fixture():
    """The :func:`imagenet_dataset_cfg` helper."""
    return imagenet_dataset_cfg


# ------------------------------------------------------------- tool runs --
def _format_value(value):
    """A value as mmengine's ``DictAction`` parses it back."""
    if isinstance(value, (list, tuple)):
        inner = ','.join(_format_value(v) for v in value)
        return f'[{inner}]' if isinstance(value, list) else f'({inner})'
    return str(value)


def cfg_options(options):
    """``{'a.b': 1}`` -> ``['a.b=1']`` for ``--cfg-options``."""
    return [f'{key}={_format_value(value)}' for key, value in options.items()]


def tiny_cifar_options(data_root, max_epochs=2, batch_size=4, **overrides):
    """``--cfg-options`` values shrinking pretrain_r18_cifar10.py for tests.

    ResNet-18 (CIFAR stem) at 8..64 channels, batch ``batch_size``, no
    dataloader workers, ``max_epochs`` epochs validating every epoch, a log
    line every iteration, all three dataloaders reading ``data_root``, and a
    fixed seed.

    Args:
        data_root (str): e.g. the ``cifar10_root`` fixture.
        max_epochs (int): ``train_cfg.max_epochs``.
        batch_size (int): For all dataloaders.
        **overrides: More options; ``__`` in a keyword stands for ``.``
            (``train_cfg__val_interval=2``); later keys win.

    Returns:
        list[str]: ``key=value`` strings.
    """
    options = {
        'model.backbone.stem_channels': 8,
        'model.backbone.base_channels': 8,
        'model.head.in_channels': 64,
        'train_cfg.max_epochs': max_epochs,
        'train_cfg.val_interval': 1,
        'default_hooks.logger.interval': 1,
        'randomness.seed': 0,
        'env_cfg.mp_cfg.mp_start_method': 'fork',
    }
    for phase in ('train', 'val', 'test'):
        options[f'{phase}_dataloader.batch_size'] = batch_size
        options[f'{phase}_dataloader.num_workers'] = 0
        options[f'{phase}_dataloader.persistent_workers'] = False
        options[f'{phase}_dataloader.dataset.data_root'] = str(data_root)
    for key, value in overrides.items():
        options[key.replace('__', '.')] = value
    return cfg_options(options)


def tiny_cifar_cfg(work_dir, data_root, config=CIFAR10_CONFIG, **overrides):
    """Arguments for ``tools/train.py`` running the tiny CIFAR-10 set-up.

    Returns ``[config, '--work-dir', work_dir, '--cfg-options', ...]``;
    ``--cfg-options`` comes last so callers can append more ``key=value``
    strings, or other flags (``--resume``) after them. Keyword arguments are
    those of :func:`tiny_cifar_options`. For ``tools/test.py`` insert the
    checkpoint after ``args[0]``.
    """
    return [str(config), '--work-dir',
            str(work_dir), '--cfg-options'] + tiny_cifar_options(
                data_root, **overrides)


@pytest.fixture(name='tiny_cifar_cfg')
def tiny_cifar_cfg_fixture():
    """The :func:`tiny_cifar_cfg` helper."""
    return tiny_cifar_cfg


@pytest.fixture(name='tiny_cifar_options')
def tiny_cifar_options_fixture():
    """The :func:`tiny_cifar_options` helper (``key=value`` strings only)."""
    return tiny_cifar_options


def free_port():
    """A TCP port that is free right now (for torchrun's master port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_tcp_port():
    """A TCP port free at set-up time (e.g. ``env={'PORT': free_tcp_port}``
    for tools/dist_train.sh)."""
    return free_port()


def tool_env(**extra):
    """Environment for tool subprocesses: the repo root on PYTHONPATH, one
    thread per process, this interpreter's directory first on PATH (so
    ``python`` in tools/dist_train.sh is this one), no CUDA devices, no
    inherited torchrun variables; ``extra`` on top (an extra ``PYTHONPATH``
    goes before the repo root, not in its place)."""
    env = dict(os.environ)
    first = [str(extra.pop('PYTHONPATH'))] if 'PYTHONPATH' in extra else []
    env['PYTHONPATH'] = os.pathsep.join(
        first + [str(REPO_ROOT)] + [p for p in [env.get('PYTHONPATH')] if p])
    env['PATH'] = os.pathsep.join(
        [osp.dirname(sys.executable),
         env.get('PATH', '')])
    env.update(
        OMP_NUM_THREADS='1',
        MKL_NUM_THREADS='1',
        CUDA_VISIBLE_DEVICES='',
        PYTHONUNBUFFERED='1')
    env.pop('LOCAL_RANK', None)
    env.pop('RANK', None)
    env.pop('WORLD_SIZE', None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


class ToolResult:
    """Outcome of :func:`run_tool`: ``returncode``, ``output`` (stdout and
    stderr interleaved), ``seconds`` (wall time) and ``tail(n)``."""

    def __init__(self, cmd, returncode, output, seconds):
        self.cmd = cmd
        self.returncode = returncode
        self.output = output
        self.seconds = seconds

    def tail(self, lines=60):
        return '\n'.join(self.output.splitlines()[-lines:])

    def __repr__(self):
        return (f'ToolResult(rc={self.returncode}, {self.seconds:.1f}s, '
                f'cmd={" ".join(self.cmd)})')


def run_tool(args, *, check=True, timeout=300, env=None, cwd=None):
    """Run a tool in a subprocess from the repository root.

    Args:
        args (list[str]): ``['tools/train.py', CONFIG, ...]`` -- a first item
            ending in ``.py`` runs with this interpreter, ``.sh`` with bash;
            anything else is run as given.
        check (bool): Assert a zero exit status (the message shows the
            command and the last lines of its output).
        timeout (float): Seconds before the process is killed (a test
            failure, not a hang).
        env (dict, optional): Extra environment variables on top of
            :func:`tool_env`.
        cwd (str, optional): Defaults to the repository root.

    Returns:
        ToolResult
    """
    args = [str(a) for a in args]
    if args[0].endswith('.py'):
        cmd = [sys.executable] + args
    elif args[0].endswith('.sh'):
        cmd = ['bash'] + args
    else:
        cmd = args
    start = time.time()
    try:
        proc = subprocess.run(
            cmd,
            cwd=str(cwd or REPO_ROOT),
            env=tool_env(**(env or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            start_new_session=True)
    except subprocess.TimeoutExpired as err:
        out = err.output or ''
        if isinstance(out, bytes):
            out = out.decode(errors='replace')
        tail = '\n'.join(out.splitlines()[-60:])
        pytest.fail(f'timed out after {timeout}s: {" ".join(cmd)}\n{tail}')
    result = ToolResult(cmd, proc.returncode, proc.stdout, time.time() - start)
    if check:
        assert proc.returncode == 0, (
            f'exit status {proc.returncode}: {" ".join(cmd)}\n'
            f'--- output tail ---\n{result.tail()}')
    return result


@pytest.fixture(name='run_tool')
def run_tool_fixture():
    """The :func:`run_tool` helper."""
    return run_tool


# ------------------------------------------------------ in-process runs --
_TOOL_MODULES = {}
_LAST_START = {}  # work_dir -> start time of the last in-process run there


def load_tool(script):
    """The module of the tool script ``script`` (a path relative to the
    repository root, e.g. ``'tools/train.py'``), imported once by its path
    under a private name (its ``if __name__ == '__main__'`` block does not
    run)."""
    path = (REPO_ROOT / str(script)).resolve()
    if path not in _TOOL_MODULES:
        import importlib.util
        name = '_gmpq_tool_' + ''.join(
            c if c.isalnum() else '_'
            for c in str(path.relative_to(REPO_ROOT)))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _TOOL_MODULES[path] = module
    return _TOOL_MODULES[path]


def _manager_classes():
    """mmengine's global singletons (MMLogger, MessageHub, Visualizer,
    DefaultScope, ...): every class built on ``ManagerMixin``."""
    from mmengine.utils import ManagerMixin
    found, todo = [], [ManagerMixin]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if '_instance_dict' in vars(cls):
            found.append(cls)
    return found


def _registries():
    """Every registry of mmengine and mmpretrain (gmpq_mm registers into
    mmpretrain's)."""
    import mmengine.registry
    import mmpretrain.registry
    from mmengine.registry import Registry
    found = {}
    for module in (mmengine.registry, mmpretrain.registry):
        for value in vars(module).values():
            if isinstance(value, Registry):
                found[id(value)] = value
    return list(found.values())


@pytest.fixture
def openmmlab_isolation():
    """Isolate what building an mmengine Runner changes in this process.

    Before: ``register_all_modules()`` (once; later calls do nothing), then
    the global state is saved: mmengine's singletons (loggers, message
    hubs, visualizers, default scopes -- emptied, so a run makes its own,
    with unique names and its own output stream), gmpq_mm's kernel-backend
    choice, the random generators and torch's thread count. After: the
    run's loggers are closed (their log files flushed), its visualizers
    closed, and everything is put back, so runs and tests do not leak
    into each other. Yields nothing; :func:`run_in_process` uses the
    same context manager, :func:`isolated_openmmlab_state`.
    """
    with isolated_openmmlab_state():
        yield


class isolated_openmmlab_state:
    """Context manager behind the ``openmmlab_isolation`` fixture."""

    def __enter__(self):
        import random

        import torch

        from gmpq_mm.quantization import kernel_backend
        from gmpq_mm.utils import register_all_modules
        register_all_modules()
        self.managers = {
            cls: cls._instance_dict.copy()
            for cls in _manager_classes()
        }
        for cls in self.managers:
            cls._instance_dict.clear()
        self.kernels = {
            key: getattr(kernel_backend, key)
            for key in ('_kernel_backend', '_long_run', '_compile_failed')
        }
        self.rng = (torch.get_rng_state(), np.random.get_state(),
                    random.getstate())
        self.threads = torch.get_num_threads()
        return self

    def __exit__(self, *exc):
        import gc
        import logging
        import random

        import torch

        from gmpq_mm.quantization import kernel_backend
        for cls, saved in self.managers.items():
            for instance in cls._instance_dict.values():
                if isinstance(instance, logging.Logger):
                    for handler in list(instance.handlers):
                        handler.close()
                        instance.removeHandler(handler)
                elif callable(getattr(instance, 'close', None)):
                    instance.close()  # a Visualizer: flush its backends
            cls._instance_dict.clear()
            cls._instance_dict.update(saved)
        for key, value in self.kernels.items():
            setattr(kernel_backend, key, value)
        torch.set_rng_state(self.rng[0])
        np.random.set_state(self.rng[1])
        random.setstate(self.rng[2])
        torch.set_num_threads(self.threads)
        gc.collect()
        return False


def _forget_modules_under(folders, names):
    """Drop the modules ``names`` imported from ``folders`` (a config's
    ``custom_imports`` from a test's folder) and what they registered, so a
    later run may import a module of the same name again."""
    gone = set()
    for name in names:
        file = getattr(sys.modules.get(name), '__file__', None) or ''
        if any(file.startswith(str(folder)) for folder in folders):
            del sys.modules[name]
            gone.add(name)
    for reg in _registries() if gone else ():
        for key, obj in list(reg._module_dict.items()):
            if getattr(obj, '__module__', None) in gone:
                del reg._module_dict[key]


def _work_dir_of(args):
    for flag in ('--work-dir', '--work_dir'):
        if flag in args and args.index(flag) + 1 < len(args):
            return osp.abspath(args[args.index(flag) + 1])
    return None


def run_in_process(args, *, check=True, timeout=None, env=None, cwd=None):
    """Run a Python tool's ``main(argv)`` in this process, as
    :func:`run_tool` would run it in a fresh one (same arguments, same
    :class:`ToolResult`).

    For the many runs where a fresh interpreter is not the point: it saves
    the ~5 s of imports of each subprocess. Inside
    :func:`isolated_openmmlab_state`, from ``cwd`` (the repository root by
    default), with ``env`` set in ``os.environ`` (an extra ``PYTHONPATH``
    also goes first on ``sys.path``, and modules imported from it are
    forgotten afterwards), one torch thread (as ``OMP_NUM_THREADS=1`` in
    :func:`tool_env`), and stdout, stderr, mmengine's log lines and Python
    warnings (each shown once per run, as in a new process) captured
    together into ``output``. ``returncode`` is what the process would
    have exited with: 0, the code of a ``SystemExit`` (its message, when
    it is one, goes into ``output`` and the code is 1), ``main``'s integer
    return value (``sys.exit(main())``), or 1 with the traceback in
    ``output`` for any other exception. Two runs into the same
    ``--work-dir`` start in different seconds, so each gets its own
    timestamped log folder as separate processes would. ``timeout`` is
    accepted for :func:`run_tool`'s signature and not enforced.

    Keep :func:`run_tool` (a subprocess) for torchrun / gloo, shell
    scripts, start-up and import behaviour, and the one train -> test ->
    export smoke test.
    """
    import contextlib
    import io
    import traceback
    import warnings

    import torch

    args = [str(a) for a in args]
    assert args[0].endswith('.py'), f'not a Python tool: {args[0]}'
    tool = load_tool(args[0])
    work_dir = _work_dir_of(args)
    if work_dir in _LAST_START:
        last = _LAST_START[work_dir]
        if int(time.time()) == int(last):
            time.sleep(1.0 - time.time() % 1.0 + 0.01)
    env = {k: str(v) for k, v in (env or {}).items()}
    extra_path = env.get('PYTHONPATH')
    old_environ, old_cwd, old_argv = dict(os.environ), os.getcwd(), sys.argv
    old_modules = set(sys.modules)
    buffer = io.StringIO()
    returncode = 0
    start = time.time()
    if work_dir:
        _LAST_START[work_dir] = start

    def show(message, category, filename, lineno, file=None, line=None):
        buffer.write(
            warnings.formatwarning(message, category, filename, lineno, line))

    with isolated_openmmlab_state(), warnings.catch_warnings():
        warnings.simplefilter('default')
        warnings.showwarning = show
        os.environ.pop('LOCAL_RANK', None)
        os.environ.pop('RANK', None)
        os.environ.pop('WORLD_SIZE', None)
        os.environ.update(env)
        if extra_path:
            sys.path[:0] = extra_path.split(os.pathsep)
        os.chdir(str(cwd or REPO_ROOT))
        sys.argv = list(args)  # argparse names the program after argv[0]
        torch.set_num_threads(1)
        try:
            with contextlib.redirect_stdout(buffer), \
                    contextlib.redirect_stderr(buffer):
                value = tool.main(args[1:])
            if isinstance(value, int) and not isinstance(value, bool):
                returncode = value
        except SystemExit as err:
            if err.code is None or isinstance(err.code, int):
                returncode = err.code or 0
            else:
                buffer.write(f'{err.code}\n')
                returncode = 1
        except Exception:  # noqa: BLE001 - what the process would print
            buffer.write(traceback.format_exc())
            returncode = 1
        finally:
            os.chdir(old_cwd)
            sys.argv = old_argv
            os.environ.clear()
            os.environ.update(old_environ)
            if extra_path:
                for entry in extra_path.split(os.pathsep):
                    sys.path.remove(entry)
                _forget_modules_under(
                    extra_path.split(os.pathsep),
                    set(sys.modules) - old_modules)
    result = ToolResult(['<in process>'] + args, returncode, buffer.getvalue(),
                        time.time() - start)
    if check:
        assert returncode == 0, (
            f'exit status {returncode}: {" ".join(args)}\n'
            f'--- output tail ---\n{result.tail()}')
    return result


@pytest.fixture(name='run_in_process')
def run_in_process_fixture():
    """The :func:`run_in_process` helper."""
    return run_in_process


def shared_session_folder(tmp_path_factory, name, build):
    """A folder built once per test run, even across pytest-xdist workers.

    The first worker to ask calls ``build(folder)`` under a file lock; the
    others wait for it and reuse the result (each xdist worker is its own
    session, so a plain session fixture would be built once per worker).
    Without xdist it is an ordinary session-scoped folder.

    Returns:
        pathlib.Path: ``<base temp>/<name>``, built.
    """
    import shutil

    from filelock import FileLock  # a torch dependency
    root = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        root = root.parent  # shared by the workers of this run
    folder = root / name
    with FileLock(str(root / f'{name}.lock')):
        if not (folder / '.built').is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / '.built').write_text('')
    return folder


@pytest.fixture(scope='session')
def trained_cifar_r18(tmp_path_factory, cifar10_root):
    """work_dir of ``tools/train.py`` on the tiny CIFAR-10 set-up, 2 epochs
    (run in process, once per test run: :func:`shared_session_folder`).

    Holds ``epoch_1.pth``, ``epoch_2.pth``, ``last_checkpoint``, the run's
    timestamped log folder and ``train_output.txt`` (the console output).
    Read-only for tests: copy it before resuming into it.
    """

    def build(work_dir):
        result = run_in_process(
            ['tools/train.py'] +
            tiny_cifar_cfg(work_dir, cifar10_root, max_epochs=2))
        (work_dir / 'train_output.txt').write_text(result.output)

    return shared_session_folder(tmp_path_factory, 'cifar_r18_2ep', build)


@pytest.fixture(scope='session')
def tiny_search(tmp_path_factory, cifar10_root, trained_cifar_r18):
    """The default tiny bilevel search, run once per test run (in process;
    :func:`shared_session_folder`).

    :func:`write_search_configs` with its defaults (2 epochs against the
    ``trained_cifar_r18`` teacher's ``epoch_2.pth``) and ``tools/train.py``.
    A namespace: ``config`` (the search config), ``teacher_ckpt``,
    ``work_dir`` (``epoch_1.pth``, ``epoch_2.pth``, ``policy.json``,
    ``policy_epoch_{1,2}.json``, the log folder) and ``output`` (the
    console output). Read-only for tests: copy what you change.
    """
    from types import SimpleNamespace
    teacher_ckpt = trained_cifar_r18 / 'epoch_2.pth'

    def build(folder):
        config = write_search_configs(folder, REPO_ROOT, cifar10_root,
                                      teacher_ckpt)
        result = run_in_process(
            ['tools/train.py', config, '--work-dir', folder / 'work'])
        (folder / 'train_output.txt').write_text(result.output)

    folder = shared_session_folder(tmp_path_factory, 'tiny_search', build)
    return SimpleNamespace(
        config=folder / 'search.py',
        teacher_ckpt=teacher_ckpt,
        work_dir=folder / 'work',
        output=(folder / 'train_output.txt').read_text())


def assert_png(path, size):
    """``path`` is a PNG that opens, is ``size`` = (width, height) pixels
    and is not blank (its pixels are not all one colour)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == 'PNG', path
        assert image.size == tuple(size), (path, image.size, size)
        pixels = np.asarray(image.convert('RGB'), dtype=np.float32)
    assert pixels.std() > 1.0, f'{path} is blank'
    # More than a frame: a real drawing uses several distinct colours.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 8, path


@pytest.fixture
def png_check():
    """The :func:`assert_png` check, for tests of the picture tools."""
    return assert_png


def write_search_configs(tmp_path,
                         repo_root,
                         data_root,
                         teacher_ckpt,
                         base='configs/gmpq/search_r18_cifar10.py',
                         extra_text='',
                         **extra):
    """A tiny teacher config and a tiny search config inheriting ``base``:
    8..64-channel ResNet-18, batch 4, a log (and scalars) line every
    iteration, 2 epochs. ``extra`` adds ``key = value`` lines, and
    ``extra_text`` verbatim config text, at the end."""
    import textwrap
    teacher = Path(tmp_path) / 'teacher.py'
    teacher.write_text(
        textwrap.dedent(f'''
        _base_ = ['{repo_root}/configs/gmpq/pretrain_r18_cifar10.py']
        model = dict(backbone=dict(stem_channels=8, base_channels=8),
                     head=dict(in_channels=64))
    '''))
    loader = (f"dict(batch_size=4, num_workers=0, persistent_workers=False, "
              f"dataset=dict(data_root='{data_root}', "
              f"pipeline=[dict(type='PackInputs')]))")
    body = textwrap.dedent(f'''
        _base_ = ['{repo_root}/{base}']
        model = dict(
            backbone=dict(backbone=dict(stem_channels=8, base_channels=8)),
            head=dict(in_channels=64),
            teacher='{teacher}',
            teacher_checkpoint='{teacher_ckpt}')
        train_dataloader = {loader}
        val_dataloader = {loader}
        test_dataloader = val_dataloader
        train_cfg = dict(max_epochs=2, val_interval=2)
        default_hooks = dict(logger=dict(interval=1))
        randomness = dict(seed=0)
    ''')
    for key, value in extra.items():
        body += f'{key} = {value}\n'
    body += extra_text + '\n'
    search = Path(tmp_path) / 'search.py'
    search.write_text(body)
    return search
