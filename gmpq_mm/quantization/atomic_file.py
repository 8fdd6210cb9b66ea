"""Write a file so that it is either whole or not there at all.

Pure stdlib: used by the policy writer and the picture/report tools.
"""
import os
import os.path as osp
import re
import tempfile
from contextlib import contextmanager
from typing import Iterator

__all__ = ['atomic_path', 'write_text_atomic']


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_stale(folder: str, name: str, suffix: str) -> None:
    """Remove ``.<name>.<pid>.<random><suffix>`` siblings left by writers
    that were killed (their process is gone); a live writer's file stays.
    Older random-only names (no pid) are removed too."""
    pattern = re.compile(r'^\.' + re.escape(name) + r'\.(?:(\d+)\.)?[^.]+' +
                         re.escape(suffix) + '$')
    for entry in os.listdir(folder):
        match = pattern.match(entry)
        if match and not (match.group(1) and _pid_alive(int(match.group(1)))):
            try:
                os.remove(osp.join(folder, entry))
            except OSError:
                pass


@contextmanager
def atomic_path(path: str, suffix: str = '.tmp') -> Iterator[str]:
    """Yield a temporary sibling of ``path`` to write; on success it is
    moved over ``path`` with ``os.replace``, on any error it is removed.

    The temporary name carries the writer's pid, so a sibling left by a
    killed writer (SIGKILL runs no clean-up) is removed by the next write
    of the same path.

    The file gets the mode a plain ``open`` would give it (mkstemp makes
    it owner-only), so others can read policies and pictures.
    """
    path = os.fspath(path)
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    _remove_stale(folder, osp.basename(path), suffix)
    fd, tmp = tempfile.mkstemp(
        dir=folder,
        prefix=f'.{osp.basename(path)}.{os.getpid()}.',
        suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return os.fspath(path)
