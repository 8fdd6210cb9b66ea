"""A grid of attribution maps: image | FP teacher's map | quantized map.

One row per image. The maps (a few pixels a side at the last stage) are
upsampled bilinearly to the image, scaled to their own maximum (the GMPQ
loss compares per-sample normalised maps, so only the shape matters) and
laid over a grey copy of the image with a colour map, so the colours read
the same over any image.
"""
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

from .figure_io import plt

__all__ = [
    'AttributionRow', 'upsample_map', 'normalize_map', 'grid_size_px',
    'draw_attribution_grid'
]

# Pixel layout of one panel: a square picture under two lines of title.
PANEL_PX = 220
TITLE_PX = 56
MARGIN_PX = 14
CELL_W_PX = PANEL_PX + 2 * MARGIN_PX
CELL_H_PX = PANEL_PX + TITLE_PX + MARGIN_PX
HEADER_PX = 40
FOOTER_PX = 64
NUM_COLUMNS = 3


@dataclass
class AttributionRow:
    """What one row of the grid shows.

    Args:
        image: ``(H, W)`` grey or ``(H, W, 3)`` RGB, uint8 or float in
            ``[0, 1]``.
        teacher_map, student_map: ``(h, w)`` non-negative maps, any size.
        image_title, teacher_title, student_title: Panel titles (``\\n``
            for a second line).
    """

    image: np.ndarray
    teacher_map: np.ndarray
    student_map: np.ndarray
    image_title: str = ''
    teacher_title: str = ''
    student_title: str = ''


def _source_index(n_out: int, n_in: int):
    """Bilinear source indices and weights, half-pixel centres (as
    ``torch.nn.functional.interpolate(..., align_corners=False)``)."""
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    low = np.floor(pos).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    return low, high, pos - low


def upsample_map(amap: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resize a 2-D map to ``size = (H, W)`` bilinearly."""
    amap = np.asarray(amap, dtype=np.float64)
    if amap.ndim != 2:
        raise ValueError(f'a map must be 2-D, got shape {amap.shape}')
    y0, y1, ty = _source_index(size[0], amap.shape[0])
    x0, x1, tx = _source_index(size[1], amap.shape[1])
    top = amap[y0][:, x0] * (1 - tx) + amap[y0][:, x1] * tx
    bottom = amap[y1][:, x0] * (1 - tx) + amap[y1][:, x1] * tx
    return top * (1 - ty)[:, None] + bottom * ty[:, None]


def normalize_map(amap: np.ndarray) -> np.ndarray:
    """``amap / max(amap)`` clipped to ``[0, 1]``; an all-zero map stays
    zero (ReLU can switch off every position)."""
    amap = np.clip(np.asarray(amap, dtype=np.float64), 0, None)
    peak = amap.max() if amap.size else 0.0
    return amap / peak if peak > 0 else np.zeros_like(amap)


def _as_float_image(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` floats in ``[0, 1]`` from grey or RGB, uint8 or float."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError('an image must be (H, W) or (H, W, 3), got shape '
                         f'{image.shape}')
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    return np.clip(image.astype(np.float64), 0.0, 1.0)


def _grey(image: np.ndarray) -> np.ndarray:
    """Luma (ITU-R 601) of an ``(H, W, 3)`` float image."""
    return image @ np.array([0.299, 0.587, 0.114])


def grid_size_px(num_rows: int) -> Tuple[int, int]:
    """``(width, height)`` in pixels of a grid of ``num_rows`` rows."""
    return (NUM_COLUMNS * CELL_W_PX,
            HEADER_PX + num_rows * CELL_H_PX + FOOTER_PX)


def _axes_at(fig, left_px, top_px, width_px, height_px, size_px):
    """Axes placed in pixels from the figure's top-left corner."""
    fig_w, fig_h = size_px
    return fig.add_axes([
        left_px / fig_w, 1 - (top_px + height_px) / fig_h, width_px / fig_w,
        height_px / fig_h
    ])


def draw_attribution_grid(rows: Sequence[AttributionRow],
                          title: str = '',
                          cmap: str = 'jet',
                          alpha: float = 0.5,
                          dpi: int = 100):
    """Draw the grid; save it with :func:`figure_io.save_figure` at ``dpi``.

    Args:
        rows (Sequence[AttributionRow]): One per image.
        title (str): Figure title.
        cmap (str): Matplotlib colour map of the maps.
        alpha (float): Opacity of the maps over the grey image.
        dpi (int): The figure is :func:`grid_size_px` pixels at this dpi.

    Returns:
        matplotlib.figure.Figure
    """
    if not rows:
        raise ValueError('draw_attribution_grid needs at least one row')
    size_px = grid_size_px(len(rows))
    fig = plt.figure(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    if title:
        fig.text(
            0.5,
            1 - HEADER_PX / 2 / size_px[1],
            title,
            ha='center',
            va='center',
            fontsize=11,
            weight='bold')
    colour_map = plt.get_cmap(cmap)
    for r, row in enumerate(rows):
        image = _as_float_image(row.image)
        height, width = image.shape[:2]
        # The image keeps its own pixels; each map is upsampled to them.
        under = np.repeat(_grey(image)[..., None], 3, axis=2)
        panels = [(image, None, row.image_title),
                  (under, row.teacher_map, row.teacher_title),
                  (under, row.student_map, row.student_title)]
        top = HEADER_PX + r * CELL_H_PX + TITLE_PX
        for c, (picture, amap, panel_title) in enumerate(panels):
            ax = _axes_at(fig, c * CELL_W_PX + MARGIN_PX, top, PANEL_PX,
                          PANEL_PX, size_px)
            ax.imshow(picture, interpolation='nearest')
            if amap is not None:
                heat = normalize_map(upsample_map(amap, (height, width)))
                ax.imshow(
                    heat,
                    cmap=colour_map,
                    vmin=0.0,
                    vmax=1.0,
                    alpha=alpha,
                    interpolation='nearest')
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(panel_title, fontsize=9, pad=4)
    bar = _axes_at(fig, CELL_W_PX + MARGIN_PX, size_px[1] - FOOTER_PX + 8,
                   2 * CELL_W_PX - 2 * MARGIN_PX, 12, size_px)
    scale = fig.colorbar(
        plt.cm.ScalarMappable(cmap=colour_map, norm=plt.Normalize(0.0, 1.0)),
        cax=bar,
        orientation='horizontal')
    scale.ax.tick_params(labelsize=8)
    scale.set_label(
        'attribution / its maximum (each map on its own scale)', fontsize=8)
    return fig
