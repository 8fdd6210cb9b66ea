"""Write a file so that it is either whole or not there at all.

Pure stdlib: used by the policy writer and the picture/report tools.
"""
import os
import os.path as osp
import tempfile
from contextlib import contextmanager
from typing import Iterator

__all__ = ['atomic_path', 'write_text_atomic']


@contextmanager
def atomic_path(path: str, suffix: str = '.tmp') -> Iterator[str]:
    """Yield a temporary sibling of ``path`` to write; on success it is
    moved over ``path`` with ``os.replace``, on any error it is removed.

    The file gets the mode a plain ``open`` would give it (mkstemp makes
    it owner-only), so others can read policies and pictures.
    """
    path = os.fspath(path)
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=folder, prefix=f'.{osp.basename(path)}.', suffix=suffix)
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
