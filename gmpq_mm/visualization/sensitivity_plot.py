"""Per-layer sensitivity to each (w, a) pair, and the pairs allocated.

A heat map: one row per searchable layer (network order), one column per
candidate pair, colour = log10 of the sensitivity (the estimated loss
increase when that layer alone is quantized at that pair); the pair the
allocation chose for each layer is framed. Beside it, each layer's share of
the searched MACs, so that it shows whether the bits went where the loss is
sensitive or where the cost is.

Pure: a sensitivity table (as ``sensitivity.json``) in, a PNG out; nothing
from mmengine.
"""
import math
from typing import Mapping

import numpy as np

from .figure_io import plt, save_figure, whole_pixels

__all__ = ['sensitivity_matrix', 'plot_sensitivity']

# Sensitivities at or below this are drawn as this (log scale; a measured
# loss increase can be 0 or negative).
FLOOR = 1e-8


def sensitivity_matrix(table: Mapping) -> np.ndarray:
    """``(layers, pairs)`` array of the table's sensitivities, clipped
    below at :data:`FLOOR`, in ``table['pairs']`` order."""
    pairs = list(table['pairs'])
    rows = [[max(float(row['sensitivity'][p]), FLOOR) for p in pairs]
            for row in table['layers']]
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(pairs))


def plot_sensitivity(table: Mapping, path: str, dpi: int = 100) -> str:
    """Draw ``table`` (see :func:`gmpq_mm.apis.sensitivity_policy`) to a
    PNG at ``path``; returns the path."""
    layers = table['layers']
    pairs = list(table['pairs'])
    if not layers or not pairs:
        raise ValueError('sensitivity table has no layers or no pairs')
    values = np.log10(sensitivity_matrix(table))
    n, k = values.shape
    width = whole_pixels(4.0 + 0.45 * k + 2.0, dpi)
    height = whole_pixels(1.8 + 0.28 * n, dpi)
    fig, (ax, bar) = plt.subplots(
        1,
        2,
        figsize=(width, height),
        dpi=dpi,
        gridspec_kw=dict(width_ratios=[max(k, 1), 3]),
        sharey=True)
    image = ax.imshow(values, aspect='auto', cmap='viridis')
    for i, row in enumerate(layers):
        chosen = 'w{}a{}'.format(*row['chosen'])
        j = pairs.index(chosen)
        ax.add_patch(
            plt.Rectangle((j - 0.5, i - 0.5),
                          1,
                          1,
                          fill=False,
                          edgecolor='red',
                          linewidth=2))
    ax.set_xticks(range(k))
    ax.set_xticklabels(pairs, rotation=90, fontsize=7)
    ax.set_yticks(range(n))
    ax.set_yticklabels([row['name'] for row in layers], fontsize=7)
    ax.set_xlabel('(weight, activation) bits; red: allocated')
    fig.colorbar(
        image,
        ax=ax,
        fraction=0.04,
        pad=0.01,
        label='log10 sensitivity (loss increase)')
    macs = np.array([float(row['macs']) for row in layers])
    share = macs / macs.sum() if macs.sum() > 0 else macs
    bar.barh(range(n), share * 100, color='#555555')
    bar.set_xlabel('% of searched MACs')
    budget = table.get('target_bitops')
    title = (f"{table.get('method', '?')} sensitivity, "
             f"{table.get('calib_batches', '?')} batches")
    if budget:
        title += (f"; BitOPs {table['bitops'] / 1e6:.2f}M of budget "
                  f"{float(budget) / 1e6:.2f}M")
    loss = table.get('predicted_loss_increase')
    if loss is not None and math.isfinite(loss):
        title += f'; predicted loss increase {loss:.4g}'
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(
        left=0.22,
        right=0.98,
        bottom=1.1 / height,
        top=1 - 0.5 / height,
        wspace=0.25)
    return save_figure(fig, path, dpi)
