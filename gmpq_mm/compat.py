"""The few fixes the pinned stack (torch 2.14 + mmengine 0.10.7) needs.

All of them live here so they are easy to find and to drop once upstream
catches up. Importing :mod:`gmpq_mm` applies :func:`patch_checkpoint_loading`.

Trust assumption: checkpoints given to gmpq_mm (``load_from``, ``resume``,
``init_cfg``, the search teacher) are trusted files -- your own work_dirs or
OpenMMLab's published URLs. torch>=2.6 loads with ``weights_only=True`` by
default, which rejects mmengine checkpoints (they pickle a ``MessageHub`` with
``HistoryBuffer`` objects, numpy scalars, ...). We first try the safe loader
with the few mmengine/numpy types allow-listed (and ``getattr`` only on
``HistoryBuffer``'s statistics), which loads mmengine's own checkpoints, and
fall back to full
unpickling -- which can run code from the file -- with a warning naming the
file. Set ``GMPQ_MM_STRICT_LOAD`` to 1 / true / yes / on to refuse that
fallback (:func:`strict_load_enabled`).
"""
import logging
import os
import os.path as osp
import pickle
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as torch_dist
from mmengine.logging import HistoryBuffer, print_log
from mmengine.runner.checkpoint import CheckpointLoader

STRICT_LOAD_ENV = 'GMPQ_MM_STRICT_LOAD'


# mmengine's MessageHub pickles HistoryBuffer's statistic methods as
# ``getattr(HistoryBuffer, 'min')``; only those look-ups are allowed.
_HISTORY_BUFFER_METHODS = ('min', 'max', 'mean', 'current')


def _history_buffer_getattr(obj, name):
    """Stands in for ``builtins.getattr`` inside the safe unpickler."""
    if obj is HistoryBuffer and name in _HISTORY_BUFFER_METHODS:
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'getattr({obj!r}, {name!r}) is not allowed in a checkpoint')


def _safe_globals():
    """Types mmengine writes into checkpoints besides tensors."""
    allowed = [HistoryBuffer, np.dtype, np.ndarray, np.core.multiarray.scalar,
               np.core.multiarray._reconstruct,
               (_history_buffer_getattr, 'builtins.getattr')]
    allowed += [type(np.dtype(t)) for t in ('float64', 'float32', 'int64',
                                            'int32', 'bool')]
    return allowed


# ---- issue 12: strict-load flag and checkpoint read errors -----------------
_TRUE = ('1', 'true', 'yes', 'on')
_FALSE = ('', '0', 'false', 'no', 'off')


def strict_load_enabled() -> bool:
    """``GMPQ_MM_STRICT_LOAD``: 1 / true / yes / on (any case) turn it on,
    unset / 0 / false / no / off leave it off; anything else is an error
    (a typo must not silently mean "off")."""
    value = os.environ.get(STRICT_LOAD_ENV, '').strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f'{STRICT_LOAD_ENV}={os.environ[STRICT_LOAD_ENV]!r}: '
                     f'use one of {_TRUE} (on) or {_FALSE[1:]} (off)')


def unreadable_checkpoint(filename, err) -> ValueError:
    """A ValueError naming ``filename`` for a file torch cannot read
    (truncated, empty, text, not a checkpoint at all)."""
    size = osp.getsize(filename) if osp.isfile(filename) else 0
    what = 'empty' if size == 0 else 'truncated, damaged or not a ' \
        'PyTorch checkpoint'
    first = str(err).strip().splitlines()[0] if str(err).strip() else ''
    return ValueError(f'{filename}: cannot read this checkpoint ({what}, '
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


def _drop_ddp_wrapper(runner) -> None:
    """Replace ``runner.model`` (a DDP wrapper) by its module and collect
    the garbage, so nothing but torch holds the process group."""
    import gc
    model = getattr(runner, 'model', None)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        runner.model = model.module
    del model
    gc.collect()


def load_trusted_checkpoint(filename, map_location=None):
    """``torch.load`` for a trusted checkpoint file (see module docstring).

    Args:
        filename (str): Path of a local checkpoint file.
        map_location: As for :func:`torch.load`.

    Returns:
        dict: The loaded checkpoint.
    """
    filename = osp.expanduser(filename)
    if not filename:
        raise FileNotFoundError('checkpoint file not found: the path is '
                                'empty')
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint file not found: {filename}')
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return check_finite_weights(torch.load(
                filename, map_location=map_location, weights_only=True),
                filename)
    except pickle.UnpicklingError as err:
        if strict_load_enabled():
            raise pickle.UnpicklingError(
                f'{filename}: refusing to unpickle objects beyond tensors '
                f'because {STRICT_LOAD_ENV} is on ({err})') from err
    except Exception as err:
        raise unreadable_checkpoint(filename, err) from None
    print_log(
        f'{filename} holds Python objects beyond tensors; loading it '
        'with full unpickling because checkpoints are trusted in '
        f'gmpq_mm (set {STRICT_LOAD_ENV}=1 to refuse).',
        logger='current',
        level=logging.WARNING)
    try:
        loaded = torch.load(
            filename, map_location=map_location, weights_only=False)
    except Exception as err:
        raise unreadable_checkpoint(filename, err) from None
    return check_finite_weights(loaded, filename)


def _load_local(filename, map_location=None):
    return load_trusted_checkpoint(filename, map_location)


def _load_http(filename, map_location=None, model_dir=None):
    """Download once per node (local rank 0 first), then load as trusted."""
    from mmengine.dist import get_dist_info
    model_dir = model_dir or osp.join(torch.hub.get_dir(), 'checkpoints')
    cached = osp.join(model_dir, osp.basename(urlparse(filename).path))
    rank, world_size = get_dist_info()
    local_rank = int(os.environ.get('LOCAL_RANK', rank))
    if local_rank == 0 and not osp.isfile(cached):
        os.makedirs(model_dir, exist_ok=True)
        torch.hub.download_url_to_file(filename, cached, progress=False)
    if world_size > 1:
        torch_dist.barrier()
    return load_trusted_checkpoint(cached, map_location)


def patch_checkpoint_loading():
    """Route mmengine's local and http checkpoint loading through ours."""
    CheckpointLoader.register_scheme(prefixes='', loader=_load_local,
                                     force=True)
    CheckpointLoader.register_scheme(
        prefixes=('http://', 'https://'), loader=_load_http, force=True)


def init_cpu_distributed(launcher, timeout=None):
    """Start a gloo process group when there is no CUDA.

    mmengine's ``init_dist`` always calls ``torch.cuda.set_device`` on this
    path, which fails on a CPU-only machine; once a process group exists the
    Runner skips ``init_dist``. Only the ``pytorch`` launcher (torchrun) is
    handled: it sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
    ``timeout`` (seconds, ``env_cfg.dist_cfg.timeout``) bounds every
    collective, as mmengine does for NCCL.

    Returns:
        bool: whether a process group was started here.
    """
    if launcher == 'none' or torch.cuda.is_available():
        return False
    if torch_dist.is_initialized():
        return False
    if launcher != 'pytorch':
        raise RuntimeError(
            f"launcher '{launcher}' needs CUDA; on a CPU-only machine use "
            "'pytorch' (tools/dist_train.sh) which runs gloo")
    kwargs = {}
    if timeout is not None:
        # As mmengine's init_dist does for NCCL: seconds -> timedelta. Every
        # gloo collective (DDP's allreduce, barriers) then fails after it
        # instead of waiting 30 minutes for a frozen rank.
        import datetime
        kwargs['timeout'] = datetime.timedelta(seconds=float(timeout))
    torch_dist.init_process_group(backend='gloo', **kwargs)
    return True


def prepare_cpu_distributed(cfg):
    """For a CPU-only distributed run: start gloo and pick a DDP wrapper that
    accepts CPU modules. A no-op with CUDA or without a launcher.

    Args:
        cfg (Config): The full config; ``cfg.launcher`` must be set.
    """
    dist_cfg = (cfg.get('env_cfg') or {}).get('dist_cfg') or {}
    if not init_cpu_distributed(cfg.launcher, dist_cfg.get('timeout')):
        return
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})
    cfg.env_cfg.dist_cfg['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg') or {}
    if wrapper.get('type', 'MMDistributedDataParallel') == \
            'MMDistributedDataParallel':
        # Scope-qualified: the Runner looks the type up in mmengine's root
        # MODEL_WRAPPERS, which does not search mmpretrain's child registry.
        wrapper['type'] = 'mmpretrain.AnyDeviceDistributedDataParallel'
    cfg.model_wrapper_cfg = wrapper


def finish_distributed(runner=None) -> None:
    """Wait for every rank, then tear the process group down for real.

    ``destroy_process_group`` only drops torch's own references: the DDP
    wrapper of a live ``runner`` (its reducer) still holds the gloo process
    group, so the group's native threads lived on (measured: 3 before and
    after the call) until garbage collection at interpreter shutdown
    destroyed it -- a race with finalization that aborted a finished run in
    a share of runs ("terminate called without an active exception",
    SIGABRT, rc 1). So the wrapper is dropped first (the runner keeps the
    bare model) and collected; the group then dies inside
    ``destroy_process_group`` while Python is fully alive. A no-op without
    a process group.
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        _drop_ddp_wrapper(runner)
        dist.barrier()
        dist.destroy_process_group()


def export_onnx(module, args, path, **kwargs):
    """``torch.onnx.export`` with the TorchScript-based exporter pinned.

    torch < 2.9 uses the TorchScript exporter by default, torch >= 2.9 the
    ``torch.export``-based one (``dynamo=True``), which needs the extra
    ``onnxscript`` package and names and folds the graph differently. The
    gmpq QDQ export (:mod:`gmpq_mm.quantization.onnx_qdq`) is written for the
    TorchScript exporter's output (Clip, QuantizeLinear, DequantizeLinear,
    Conv / Gemm, parameters as named initializers), so it is asked for
    explicitly; its DeprecationWarning in torch >= 2.9 is silenced here.
    """
    import inspect
    import warnings
    if 'dynamo' in inspect.signature(torch.onnx.export).parameters:
        kwargs['dynamo'] = False
    with warnings.catch_warnings():
        warnings.filterwarnings(
            'ignore', category=DeprecationWarning, module=r'torch\.onnx')
        warnings.filterwarnings(
            'ignore', message='.*legacy TorchScript-based ONNX export.*')
        torch.onnx.export(module, args, path, **kwargs)
