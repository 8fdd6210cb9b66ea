"""Reading checkpoint files without running code from them.

A ``.pth`` file is a pickle, and unpickling can run any code the file
names. gmpq_mm reads every checkpoint (``load_from``, ``resume``,
``init_cfg``, the search teacher, test and export) through
:func:`load_checkpoint_file`, which by default **runs nothing**:

* torch >= 2.6: torch's safe (``weights_only``) loader with the few types
  mmengine and mmpretrain put beside the tensors allow-listed
  (``HistoryBuffer`` of the ``MessageHub``, numpy scalars / arrays /
  dtypes, and ``getattr`` on ``HistoryBuffer``'s statistics only). Our own
  work_dirs' checkpoints (resume included) and OpenMMLab's published
  weights (``state_dict`` + ``meta`` of plain values) load this way. A
  file that needs anything else is refused, in one line that names what it
  needs and the switch below.
* torch < 2.6 (2.1 ... 2.5) cannot allow-list ``getattr``, so its safe
  loader takes tensor-only files (published weights) but not mmengine's
  resume checkpoints. There a file the safe loader rejects is still loaded
  with full unpickling, with a warning, unless the switch is set to off.

``GMPQ_MM_TRUST_CHECKPOINTS``: on (1 / true / yes / on) loads every
checkpoint with full unpickling -- only for files you trust, they can run
code; off (0 / false / no / off) refuses anything beyond the allow-list on
every torch. ``GMPQ_MM_STRICT_LOAD=1`` (the older switch) still works and
means ``GMPQ_MM_TRUST_CHECKPOINTS=0``; it is deprecated.

Whatever the mode, a file is unpickled once per load; a Python pickle that
is not a PyTorch checkpoint is reported as such without being unpickled.
"""
import logging
import os
import os.path as osp
import pickle
import re
import weakref
import zipfile
from typing import Optional
from urllib.parse import urlparse

import numpy as np
import torch
from mmengine.logging import print_log

from gmpq_mm.compat import (SAFE_GLOBALS_USABLE, load_weights_only,
                            numpy_multiarray)
from gmpq_mm.utils.env_flags import env_flag

__all__ = [
    'TRUST_ENV', 'STRICT_LOAD_ENV', 'CheckpointNotTrusted',
    'CheckpointDownloadError', 'UnreadableCheckpoint', 'download_error',
    'ReadOnce', 'trust_checkpoints', 'strict_load_enabled',
    'load_checkpoint_file', 'unreadable_checkpoint', 'check_finite_weights',
    'patch_checkpoint_loading'
]

TRUST_ENV = 'GMPQ_MM_TRUST_CHECKPOINTS'
STRICT_LOAD_ENV = 'GMPQ_MM_STRICT_LOAD'  # deprecated: TRUST_ENV=0

# mmengine's MessageHub pickles HistoryBuffer's statistic methods as
# ``getattr(HistoryBuffer, 'min')``; only those look-ups are allowed.
_HISTORY_BUFFER_METHODS = ('min', 'max', 'mean', 'current')
# torch.save's pre-1.6 (non-zip) files start with this pickled number.
_LEGACY_TORCH_MAGIC = 0x1950a86a20f9469cfc6c
_warned = set()


class CheckpointNotTrusted(pickle.UnpicklingError):
    """A checkpoint needs full unpickling and the user has not opted in."""


class CheckpointDownloadError(OSError):
    """A checkpoint URL could not be fetched (offline, proxy, 404)."""


class UnreadableCheckpoint(ValueError):
    """Not a checkpoint: empty, truncated, damaged, a plain pickle."""


def download_error(url: str, cached: str, reason: str):
    """:class:`CheckpointDownloadError` saying what to do instead."""
    return CheckpointDownloadError(
        f'cannot download {url} ({reason}); without network, copy the file '
        f'to {cached} (it is then used from there) or point the config at a '
        'local copy with --cfg-options KEY=/path/to/file.pth')


def _warn_once(key, msg):
    if key not in _warned:
        _warned.add(key)
        print_log(msg, logger='current', level=logging.WARNING)


def strict_load_enabled() -> bool:
    """Whether the deprecated ``GMPQ_MM_STRICT_LOAD`` is on (same words as
    every switch, :func:`gmpq_mm.utils.env_flags.env_flag`)."""
    return bool(env_flag(STRICT_LOAD_ENV))


def trust_checkpoints() -> bool:
    """Whether checkpoints may be loaded with full unpickling.

    ``GMPQ_MM_TRUST_CHECKPOINTS`` when set; else off, except on torch < 2.6
    (which cannot load mmengine's checkpoints safely) where it is on. The
    deprecated ``GMPQ_MM_STRICT_LOAD=1`` means off.
    """
    trust = env_flag(TRUST_ENV, default=None)
    strict = env_flag(STRICT_LOAD_ENV, default=None)
    if strict is not None:
        _warn_once(
            STRICT_LOAD_ENV, f'{STRICT_LOAD_ENV} is deprecated: use '
            f'{TRUST_ENV}=0 (refuse code in checkpoints; the default on '
            f'torch>=2.6) or {TRUST_ENV}=1 (trust them)')
        if strict:
            if trust:
                raise ValueError(f'{STRICT_LOAD_ENV} is on and {TRUST_ENV} '
                                 'is on: they contradict, unset one')
            return False
    if trust is not None:
        return trust
    return not SAFE_GLOBALS_USABLE


def _history_buffer_getattr(obj, name):
    """Stands in for ``builtins.getattr`` inside the safe unpickler."""
    from mmengine.logging import HistoryBuffer
    if obj is HistoryBuffer and name in _HISTORY_BUFFER_METHODS:
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'getattr({obj!r}, {name!r}) is not allowed in a checkpoint')


def _safe_globals():
    """Types mmengine writes into checkpoints besides tensors.

    numpy's ``multiarray`` moved from ``numpy.core`` to ``numpy._core`` in
    numpy 2, and a checkpoint names it as the numpy that wrote it did, so
    both names are allowed for the same objects.
    """
    from mmengine.logging import HistoryBuffer
    multiarray = numpy_multiarray()
    allowed = [
        HistoryBuffer, np.dtype, np.ndarray,
        (_history_buffer_getattr, 'builtins.getattr')
    ]
    for core in ('numpy.core', 'numpy._core'):
        allowed += [(multiarray.scalar, f'{core}.multiarray.scalar'),
                    (multiarray._reconstruct,
                     f'{core}.multiarray._reconstruct')]
    allowed += [
        type(np.dtype(t)) for t in ('float64', 'float32', 'float16', 'int64',
                                    'int32', 'int8', 'uint8', 'bool')
    ]
    return allowed


def unreadable_checkpoint(filename, err) -> ValueError:
    """An :class:`UnreadableCheckpoint` (a ValueError) naming ``filename``
    for a file torch cannot read (truncated, empty, text, not a checkpoint
    at all)."""
    size = osp.getsize(filename) if osp.isfile(filename) else 0
    what = 'empty' if size == 0 else 'truncated, damaged or not a ' \
        'PyTorch checkpoint'
    first = str(err).strip().splitlines()[0] if str(err).strip() else ''
    return UnreadableCheckpoint(
        f'{filename}: cannot read this checkpoint ({what}, '
        f'{size} bytes): {type(err).__name__}: {first}')


def check_finite_weights(checkpoint, filename):
    """Refuse a checkpoint whose weights hold NaN or inf (a diverged run):
    as a teacher or an initialisation it would spoil a whole run before
    anything reported it. Returns the checkpoint unchanged."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f'{filename}: a checkpoint must be a dict (with a '
                         f'state_dict), got {type(checkpoint).__name__}')
    state = checkpoint.get('state_dict', checkpoint)
    if not isinstance(state, dict):
        return checkpoint
    for key, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and \
                not bool(torch.isfinite(value).all()):
            count = int((~torch.isfinite(value)).sum())
            raise ValueError(f'{filename}: non-finite weights (NaN/inf) in '
                             f'{key} ({count} of {value.numel()} values); '
                             'the run that wrote it diverged')
    return checkpoint


class _Global(Exception):
    """Raised by :class:`_NoGlobalsUnpickler` with the global's name."""


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Reads plain values only: any class or function stops it."""

    def find_class(self, module, name):
        raise _Global(f'{module}.{name}')

    def persistent_load(self, pid):
        raise pickle.UnpicklingError('persistent id')


def _not_a_torch_file(filename) -> Optional[str]:
    """What ``filename`` is when it is a Python pickle that ``torch.save``
    did not write (None for torch's zip or legacy format, or a file that is
    no pickle at all). Only the first pickled value is read, and with every
    class and function refused, so nothing in the file runs."""
    if zipfile.is_zipfile(filename):
        return None
    with open(filename, 'rb') as f:
        if f.read(1) != pickle.PROTO:
            return None
        f.seek(0)
        try:
            first = _NoGlobalsUnpickler(f).load()
        except _Global as needs:
            return f'a Python pickle (not a PyTorch checkpoint) that needs ' \
                f'{needs}'
        except Exception:  # noqa: BLE001 - damaged: torch.load reports it
            return None
    if isinstance(first, int) and first == _LEGACY_TORCH_MAGIC:
        return None
    return f'a Python pickle of a {type(first).__name__} (not a PyTorch ' \
        'checkpoint)'


def _refused_global(err) -> str:
    found = re.search(r'GLOBAL ([\w.]+)', str(err))
    if found:
        return found.group(1)
    lines = [x for x in str(err).splitlines() if x.strip()]
    return lines[-1].strip() if lines else type(err).__name__


def _load_untrusted(filename, map_location):
    try:
        return load_weights_only(filename, map_location, _safe_globals())
    except pickle.UnpicklingError as err:
        needs = _refused_global(err)
        if trust_checkpoints():  # torch < 2.6 and not switched off
            _warn_once(
                filename, f'{filename} holds Python objects beyond tensors '
                f'({needs}) which torch {torch.__version__} cannot allow-list'
                ' (torch>=2.6 can); loading it with full unpickling. Set '
                f'{TRUST_ENV}=0 to refuse.')
            return _load_trusted(filename, map_location)
        how = (f'set {TRUST_ENV}=1 if you trust this file (it may run code)'
               if SAFE_GLOBALS_USABLE else
               f'torch {torch.__version__} can only read tensors safely; '
               f'use torch>=2.6 or set {TRUST_ENV}=1 if you trust this file')
        raise CheckpointNotTrusted(
            f'{filename}: not loaded, it needs {needs}, which is not a '
            f'tensor or a type mmengine checkpoints hold; {how}') from None


def _load_trusted(filename, map_location):
    return torch.load(filename, map_location=map_location, weights_only=False)


class ReadOnce:
    """While started, a file loaded again (same path, size, modification
    time and ``map_location``) is the object loaded before, not a second
    unpickling: a finetune reads its FP weights for ``init_cfg`` and again
    to check they fit (:class:`~gmpq_mm.engine.CalibrationHook`). The
    caller must not change the returned checkpoint in place.

    The window belongs to the object that opened it and ends with
    :meth:`stop` or when that object is garbage-collected: a run that fails
    between the hook's ``before_run`` and its ``stop`` (the Runner and its
    hooks dropped) leaves no memo behind for later loads in the process.
    """

    _memo = None
    _owner_ref = None

    def start(self) -> 'ReadOnce':
        owner = ReadOnce._owner_ref() if ReadOnce._owner_ref else None
        if ReadOnce._memo is None or owner is None:
            ReadOnce._memo = {}
            ReadOnce._owner_ref = weakref.ref(self)
            self._owner = True
        else:
            self._owner = False
        return self

    def stop(self) -> None:
        if getattr(self, '_owner', False):
            ReadOnce._memo = None
            ReadOnce._owner_ref = None
            self._owner = False

    def __enter__(self) -> 'ReadOnce':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @classmethod
    def key(cls, filename, map_location):
        if cls._memo is not None and (cls._owner_ref is None
                                      or cls._owner_ref() is None):
            cls._memo = cls._owner_ref = None  # its window was never closed
        if cls._memo is None:
            return None
        st = os.stat(filename)
        return (osp.realpath(filename), st.st_size, st.st_mtime_ns,
                repr(map_location))


def load_checkpoint_file(filename, map_location=None):
    """Read a local checkpoint file (see the module docstring for what is
    allowed in it).

    Args:
        filename (str): Path of a local checkpoint file.
        map_location: As for :func:`torch.load`.

    Returns:
        dict: The loaded checkpoint (its weights checked to be finite).

    Raises:
        FileNotFoundError: No such file.
        CheckpointNotTrusted: The file needs code to load and checkpoints
            are not trusted (the message says how to opt in).
        ValueError: Not a checkpoint (a plain pickle, an empty, truncated
            or damaged file, not a dict, or NaN/inf weights).
    """
    filename = osp.expanduser(os.fspath(filename))
    if not filename:
        raise FileNotFoundError('checkpoint file not found: the path is '
                                'empty')
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint file not found: {filename}')
    key = ReadOnce.key(filename, map_location)
    if key is not None and key in ReadOnce._memo:
        return ReadOnce._memo[key]
    what = _not_a_torch_file(filename)
    if what is not None:
        raise UnreadableCheckpoint(
            f'{filename}: {what}; not unpickled. Give a file '
            'written by torch.save (an OpenMMLab checkpoint)')
    try:
        if trust_checkpoints() and env_flag(TRUST_ENV, default=None):
            loaded = _load_trusted(filename, map_location)
        else:
            loaded = _load_untrusted(filename, map_location)
    except CheckpointNotTrusted:
        raise
    except Exception as err:
        raise unreadable_checkpoint(filename, err) from None
    check_finite_weights(loaded, filename)
    if key is not None:
        ReadOnce._memo[key] = loaded
    return loaded


def _load_local(filename, map_location=None):
    return load_checkpoint_file(filename, map_location)


def _download(url, cached):
    """Fetch ``url`` to ``cached``; None on success, else the reason."""
    try:
        os.makedirs(osp.dirname(cached), exist_ok=True)
        torch.hub.download_url_to_file(url, cached, progress=False)
    except Exception as err:  # noqa: BLE001 - URLError, HTTPError, OSError
        reason = getattr(err, 'reason', None) or err
        return f'{type(err).__name__}: {reason}'.splitlines()[0]
    return None


def _load_http(filename, map_location=None, model_dir=None):
    """Download once per node (local rank 0 first), then load it.

    Every rank learns whether the download worked, so an offline machine
    fails on all ranks at once with :class:`CheckpointDownloadError`
    instead of leaving the others at a barrier.
    """
    from mmengine.dist import all_reduce, get_dist_info
    model_dir = model_dir or osp.join(torch.hub.get_dir(), 'checkpoints')
    cached = osp.join(model_dir, osp.basename(urlparse(filename).path))
    rank, world_size = get_dist_info()
    local_rank = int(os.environ.get('LOCAL_RANK', rank))
    reason = None
    if local_rank == 0 and not osp.isfile(cached):
        reason = _download(filename, cached)
    if world_size > 1:
        failed = torch.tensor([0 if reason is None else 1])
        all_reduce(failed, op='sum')
        if int(failed) and reason is None:
            reason = 'the download failed on another rank'
    if reason is not None:
        raise download_error(filename, cached, reason)
    return load_checkpoint_file(cached, map_location)


def patch_checkpoint_loading():
    """Route mmengine's local and http checkpoint loading through ours."""
    from mmengine.runner.checkpoint import CheckpointLoader
    CheckpointLoader.register_scheme(
        prefixes='', loader=_load_local, force=True)
    CheckpointLoader.register_scheme(
        prefixes=('http://', 'https://'), loader=_load_http, force=True)
