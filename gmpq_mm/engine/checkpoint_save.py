"""Checkpoints that are whole or absent, and a full disk said in one line.

mmengine writes a checkpoint straight under its final name, so a run killed
or out of space mid-write leaves a truncated ``epoch_N.pth`` that the next
``--resume`` picks up. :func:`patch_checkpoint_saving` makes the Runner's
local writes go through :func:`save_checkpoint_atomic`: the checkpoint is
serialised in memory (mmengine does the same), written to a hidden
temporary file in the same folder (``.<name>.<pid>.<random>.tmp``), synced
and renamed over the final name. Temporary files of writers that were
killed (their process is gone) are removed by the next checkpoint written
to that folder. A full disk raises :class:`CheckpointWriteError`, one line
with the path, the bytes needed and the bytes free.
"""
import errno
import io
import os
import os.path as osp
import re
import shutil

import torch

from gmpq_mm.quantization.atomic_file import _pid_alive, atomic_path

__all__ = [
    'CheckpointWriteError', 'save_checkpoint_atomic',
    'remove_stale_checkpoint_temps', 'patch_checkpoint_saving'
]

# ``.<name>.<pid>.<random>.tmp`` (atomic_path's names) of checkpoint files.
_TEMP = re.compile(r'^\.(?P<name>.+\.pth)\.(?P<pid>\d+)\.[^.]+\.tmp$')


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, quota, read-only)."""


def _human(n: int) -> str:
    for unit in ('B', 'KB', 'MB', 'GB'):
        if n < 1024 or unit == 'GB':
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1024
    return f'{n:.1f} GB'


def remove_stale_checkpoint_temps(folder: str) -> list:
    """Remove the temporary checkpoint files of dead writers in ``folder``
    (any checkpoint name); returns the names removed."""
    removed = []
    for entry in os.listdir(folder):
        match = _TEMP.match(entry)
        if match and not _pid_alive(int(match.group('pid'))):
            try:
                os.remove(osp.join(folder, entry))
                removed.append(entry)
            except OSError:
                pass
    return removed


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint_atomic(checkpoint: dict, filename: str) -> None:
    """``torch.save`` of ``checkpoint`` to the local path ``filename``,
    atomically (see the module docstring).

    Raises:
        CheckpointWriteError: The file could not be written (nothing is left
            under ``filename`` or beside it).
    """
    filename = os.fspath(filename)
    folder = osp.dirname(osp.abspath(filename))
    os.makedirs(folder, exist_ok=True)
    remove_stale_checkpoint_temps(folder)
    with io.BytesIO() as buffer:
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
    try:
        with atomic_path(filename) as tmp:
            _write_bytes(tmp, data)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(folder).free
            raise CheckpointWriteError(
                f'{filename}: no space left to write this '
                f'checkpoint: it needs {_human(len(data))} ({len(data)} '
                f'bytes), {_human(free)} are free in {folder}; free some '
                'space or give another --work-dir, then --resume') from None
        raise CheckpointWriteError(f'{filename}: cannot write this checkpoint '
                                   f'({err.strerror or err})') from None


def _save_checkpoint(checkpoint,
                     filename,
                     file_client_args=None,
                     backend_args=None):
    """mmengine's ``save_checkpoint``: ours for local paths, mmengine's
    own for remote back-ends (``s3://``, ``pavi://`` ...)."""
    if file_client_args is None and backend_args is None and \
            '://' not in str(filename):
        return save_checkpoint_atomic(checkpoint, filename)
    return _save_checkpoint.original(checkpoint, filename, file_client_args,
                                     backend_args)


def patch_checkpoint_saving() -> None:
    """Make the Runner write checkpoints with :func:`_save_checkpoint`
    (idempotent)."""
    import mmengine.runner.checkpoint as checkpoint_module
    import mmengine.runner.runner as runner_module
    if runner_module.save_checkpoint is _save_checkpoint:
        return
    _save_checkpoint.original = checkpoint_module.save_checkpoint
    runner_module.save_checkpoint = _save_checkpoint
