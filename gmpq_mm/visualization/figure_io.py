"""Write a matplotlib figure to PNG atomically and at a known pixel size."""
import os
import os.path as osp
import tempfile

import matplotlib

matplotlib.use('Agg')  # headless: the tools run on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ['plt', 'save_figure']


def save_figure(fig, path: str, dpi: int = 100) -> str:
    """Save ``fig`` as a PNG of exactly ``figsize * dpi`` pixels.

    The image goes to a temporary sibling first and is moved over ``path``
    with ``os.replace``, so a failure never leaves a half-written picture.
    The figure is closed afterwards.

    Returns:
        str: The path written.
    """
    path = os.fspath(path)
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=folder, prefix=f'.{osp.basename(path)}.', suffix='.png')
    os.close(fd)
    try:
        # No bbox_inches='tight': it would change the pixel size.
        fig.savefig(tmp, dpi=dpi, format='png')
        # mkstemp made the file owner-only; give it the usual mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        plt.close(fig)
    return path
