"""Write a matplotlib figure to PNG atomically and at a known pixel size."""
import os

import matplotlib

matplotlib.use('Agg')  # headless: the tools run on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

from gmpq_mm.quantization.atomic_file import atomic_path  # noqa: E402

__all__ = ['plt', 'save_figure', 'whole_pixels']


def whole_pixels(inches: float, dpi: int = 100) -> float:
    """``inches``, nudged so that ``inches * dpi`` is a whole pixel count.

    A size such as ``1.1 + 2.9 + 0.8 + 1.55 + 0.35`` is 669.9999... pixels
    at 100 dpi; matplotlib 3.8 truncates that to 669 when saving, newer
    releases round it to 670. Sizes returned here are a hair above the
    whole number (or exactly on it), so every release gives the same
    ``round(inches * dpi)`` pixels.
    """
    pixels = inches * dpi
    if float(pixels).is_integer():
        return inches
    return (round(pixels) + 1e-4) / dpi


def save_figure(fig, path: str, dpi: int = 100) -> str:
    """Save ``fig`` as a PNG of exactly ``figsize * dpi`` pixels.

    The image goes to a temporary sibling first and is moved over ``path``
    with ``os.replace``, so a failure never leaves a half-written picture.
    The figure is closed afterwards.

    Returns:
        str: The path written.
    """
    path = os.fspath(path)
    try:
        with atomic_path(path, suffix='.png') as tmp:
            # No bbox_inches='tight': it would change the pixel size.
            fig.savefig(tmp, dpi=dpi, format='png')
    finally:
        plt.close(fig)
    return path
