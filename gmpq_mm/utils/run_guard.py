"""A run that fails to start leaves the work_dir as it found it.

mmengine's Runner dumps the config into the work_dir when it is built, so
a rerun that then fails (a bad dataset file, a wrong checkpoint) would
overwrite the config dump of the finished run that lives there.
"""
import os
import os.path as osp
import shutil
from contextlib import contextmanager


def _checkpoints(work_dir):
    """``name -> mtime`` of the checkpoints (and pointer) in ``work_dir``."""
    if not work_dir or not osp.isdir(work_dir):
        return {}
    return {
        name: os.stat(osp.join(work_dir, name)).st_mtime_ns
        for name in os.listdir(work_dir)
        if name.endswith('.pth') or name == 'last_checkpoint'
    }


def _dump_path(cfg):
    filename = getattr(cfg, 'filename', None)
    if not filename or not cfg.get('work_dir'):
        return None
    return osp.join(cfg.work_dir, osp.basename(filename))


@contextmanager
def restore_work_dir_on_failure(cfg):
    """Around building and running the Runner: on an exception before the
    run wrote any checkpoint (a failed start), a work_dir this run created
    is removed again, and the config dump of an earlier run is put back as
    it was (a fresh dump is removed). The failed run's own timestamped log
    folder in an existing work_dir stays, as the record of what went wrong.
    A run that failed after writing checkpoints is left as it is (its dump
    describes them).

    Only the process of rank 0 (or a single process) touches files.
    """
    work_dir = cfg.get('work_dir')
    existed = bool(work_dir) and osp.isdir(work_dir)
    dump = _dump_path(cfg)
    before = _checkpoints(work_dir)
    old = None
    if dump and osp.isfile(dump):
        with open(dump, 'rb') as f:
            old = f.read()
    try:
        yield
    except BaseException:
        if int(os.environ.get('RANK', '0')) == 0 and work_dir and \
                _checkpoints(work_dir) == before:
            if not existed:
                shutil.rmtree(work_dir, ignore_errors=True)
            elif dump and old is not None:
                with open(dump, 'wb') as f:
                    f.write(old)
            elif dump and osp.isfile(dump):
                os.remove(dump)
        raise
