"""The search curves: how each layer's bit widths and the BitOPs evolve.

One figure: on top, the supernet's expected BitOPs over the iterations
(with the chosen policy's BitOPs at each epoch end and the budget, if any)
and its mean expected weight / activation bits; below, one small panel a
layer with its candidate probabilities at the end of every epoch, weight
candidates stacked upwards and activation candidates downwards, in one
colour a bit width (the legend is drawn once).

Plain data in (policy dicts as :func:`load_policy` returns them, the
training lines of ``scalars.json`` as dicts); matplotlib only.
"""
import fnmatch
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from .figure_io import plt, whole_pixels
from .search_history import BITOPS_KEY  # in GBitOPs

__all__ = [
    'select_layers', 'probability_table', 'search_curves_figure_size',
    'draw_search_curves'
]

KINDS = (('w', 'W'), ('a', 'A'))
# Inches: width of the figure, height of the top row, of a row of layer
# panels, of the title / legend band, of the gap under the top row and of
# the margin at the bottom.
FIG_WIDTH, TOP_HEIGHT, ROW_HEIGHT = 15.0, 2.9, 1.55
HEAD_HEIGHT, TOP_GAP, BOTTOM_MARGIN = 1.1, 0.8, 0.35


def select_layers(names: Sequence[str],
                  patterns: Optional[Sequence[str]]) -> List[str]:
    """The layers of ``names`` (network order) that match ``patterns``
    (exact names or shell patterns such as ``'layer4.*'``); all if
    ``patterns`` is empty.

    Raises:
        ValueError: For a pattern that matches no layer, listing them.
    """
    if not patterns:
        return list(names)
    unmatched = [p for p in patterns if not fnmatch.filter(names, p)]
    if unmatched:
        raise ValueError(f'layer pattern(s) {unmatched} match no searched '
                         f'layer; the layers are {list(names)}')
    return [
        n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)
    ]


def _candidates(policy: dict, kind: str) -> List[int]:
    cands = policy.get(f'{kind}_candidates')
    if cands:
        return list(cands)
    return sorted({e[f'{kind}_bits'] for e in policy['layers'].values()})


def probability_table(policies: Sequence[dict], name: str,
                      kind: str) -> np.ndarray:
    """``(epochs, candidates)`` probabilities of one layer's ``kind``
    (``'w'`` / ``'a'``) candidates; a policy without ``probabilities`` gives
    its chosen bit width as one-hot."""
    cands = _candidates(policies[-1], kind)
    rows = []
    for policy in policies:
        probs = (policy.get('probabilities') or {}).get(name)
        if probs is not None:
            rows.append(probs[kind])
        else:
            chosen = policy['layers'][name][f'{kind}_bits']
            rows.append([float(b == chosen) for b in cands])
    return np.asarray(rows, dtype=float)


def _bit_colours(policy: dict) -> Dict[int, tuple]:
    """One colour a bit width of either kind, ordered from few bits (dark)
    to many (light)."""
    bits = sorted(
        set(_candidates(policy, 'w')) | set(_candidates(policy, 'a')))
    cmap = plt.get_cmap('viridis')
    spots = np.linspace(0.08, 0.92, len(bits)) if len(bits) > 1 else [0.5]
    return {b: cmap(s) for b, s in zip(bits, spots)}


def _unit(values) -> tuple:
    top = max([abs(v) for v in values if v is not None] or [0])
    for scale, prefix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'K')):
        if top >= scale:
            return scale, prefix
    return 1.0, ''


def _epoch_end_steps(scalars: Sequence[dict]) -> Dict[int, int]:
    """The last logged step of each epoch (lines carry ``epoch``)."""
    ends = {}
    for record in scalars:
        epoch = record.get('epoch')
        if isinstance(epoch, int):
            ends[epoch] = max(ends.get(epoch, 0), record['step'])
    return ends


def _legend(ax, **kwargs):
    if ax.get_legend_handles_labels()[0]:  # else matplotlib warns
        ax.legend(fontsize=8, loc='best', **kwargs)


def _draw_bitops(ax, epochs, policies, scalars):
    budget = policies[-1].get('budget')
    raw = [r[BITOPS_KEY] * 1e9 for r in scalars]
    raw += [p.get('bitops') for p in policies] + [budget]
    scale, prefix = _unit(raw)
    ends = _epoch_end_steps(scalars)
    if scalars:
        ax.plot([r['step'] for r in scalars],
                [r[BITOPS_KEY] * 1e9 / scale for r in scalars],
                color='tab:blue',
                lw=1.5,
                label='expected (supernet)')
        xs = [(ends[e], p['bitops']) for e, p in zip(epochs, policies)
              if e in ends and p.get('bitops') is not None]
        ax.set_xlabel('iteration')
    else:
        xs = [(e, p['bitops']) for e, p in zip(epochs, policies)
              if p.get('bitops') is not None]
        ax.set_xlabel('epoch')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if xs:
        ax.plot([x for x, _ in xs], [v / scale for _, v in xs],
                ls='--' if not scalars else 'none',
                marker='o',
                color='tab:orange',
                label='chosen policy, epoch end')
    if budget:
        ax.axhline(
            budget / scale,
            color='tab:red',
            ls='--',
            lw=1.2,
            label=f'budget {budget / scale:.3g}{prefix}')
    ax.set_ylabel(f'BitOPs ({prefix})' if prefix else 'BitOPs')
    ax.set_title(
        'BitOPs of the searched layers' +
        ('' if scalars else ' (no scalars.json: per-epoch policies only)'),
        loc='left',
        fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax)


def _draw_mean_bits(ax, epochs, policies, scalars):
    ends = _epoch_end_steps(scalars)
    for key, colour, label in (('mean_w_bits', 'tab:green', 'W'),
                               ('mean_a_bits', 'tab:purple', 'A')):
        if scalars:
            logged = [r for r in scalars if key in r]
            if logged:
                ax.plot([r['step'] for r in logged], [r[key] for r in logged],
                        color=colour,
                        lw=1.5,
                        label=f'{label} expected')
            xs = [(ends[e], p[key]) for e, p in zip(epochs, policies)
                  if e in ends and p.get(key) is not None]
        else:
            xs = [(e, p[key]) for e, p in zip(epochs, policies)
                  if p.get(key) is not None]
        if xs:
            ax.plot([x for x, _ in xs], [v for _, v in xs],
                    ls='none' if scalars else '--',
                    marker='o',
                    ms=4,
                    color=colour,
                    mfc='white',
                    label=f'{label} chosen')
    ax.set_xlabel('iteration' if scalars else 'epoch')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel('bits')
    ax.set_title('mean bits of the searched layers', loc='left', fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, ncol=2)


def _epoch_edges(epochs) -> np.ndarray:
    """Edges of one step per epoch: halfway between neighbours, and half
    the smallest gap (or half an epoch) beyond the first and the last."""
    x = np.asarray(epochs, dtype=float)
    half = float(np.min(np.diff(x))) / 2 if len(x) > 1 else 0.5
    return np.concatenate([[x[0] - half], (x[1:] + x[:-1]) / 2,
                           [x[-1] + half]])


def _draw_layer(ax, name, epochs, policies, colours):
    edges = _epoch_edges(epochs)
    for (kind, _), sign in zip(KINDS, (1, -1)):
        table = probability_table(policies, name, kind)
        bottom = np.zeros(len(epochs))
        # One filled step polygon a candidate (not a bar an epoch): cheap
        # to draw for many epochs and layers.
        for j, bits in enumerate(_candidates(policies[-1], kind)):
            top = bottom + table[:, j]
            ax.stairs(
                sign * top,
                edges,
                baseline=sign * bottom,
                fill=True,
                color=colours[bits],
                linewidth=0)
            bottom = top
    ax.axhline(0, color='white', lw=1.2)
    ax.set_ylim(-1, 1)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_yticks([0.5, -0.5], [label for _, label in KINDS])
    ax.tick_params(axis='both', labelsize=7, length=2, pad=1)
    if len(epochs) <= 6:
        ax.set_xticks(list(epochs))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
    chosen = policies[-1]['layers'][name]
    ax.set_title(name, loc='left', fontsize=8, pad=2)
    ax.set_title(
        f'w{chosen["w_bits"]} a{chosen["a_bits"]}',
        loc='right',
        fontsize=8,
        pad=2,
        fontweight='bold')


def _columns(n_layers: int) -> int:
    for limit, cols in ((1, 1), (4, 2), (9, 3), (16, 4), (30, 5)):
        if n_layers <= limit:
            return cols
    return 6


def search_curves_figure_size(n_layers: int) -> tuple:
    """``(width, height)`` in inches of the figure for ``n_layers``
    layer panels."""
    rows = math.ceil(n_layers / _columns(n_layers))
    return FIG_WIDTH, whole_pixels(HEAD_HEIGHT + TOP_HEIGHT + TOP_GAP +
                                   rows * ROW_HEIGHT + BOTTOM_MARGIN)


def draw_search_curves(epochs: Sequence[int],
                       policies: Sequence[dict],
                       scalars: Sequence[dict] = (),
                       layers: Optional[Sequence[str]] = None,
                       title: Optional[str] = None):
    """Draw the search curves.

    Args:
        epochs: Epoch number of each policy, ascending.
        policies: The per-epoch policies (:func:`load_policy` dicts).
        scalars: Training lines of ``scalars.json`` in step order, each
            with ``step`` and ``expected_gbitops`` (and ``mean_w_bits``,
            ``mean_a_bits``, ``epoch`` when logged). Empty: the top panels
            show the per-epoch policies only.
        layers: Layer names or shell patterns to draw (default: all).
        title: Figure title.

    Returns:
        matplotlib.figure.Figure: ``FIG_WIDTH`` inches wide, as tall as the
        layer rows need; save it with :func:`save_figure`.
    """
    if not policies or len(epochs) != len(policies):
        raise ValueError('draw_search_curves needs one policy per epoch, '
                         f'got {len(epochs)} epochs, {len(policies)} policies')
    names = select_layers(list(policies[-1]['layers']), layers)
    scalars = [r for r in scalars if BITOPS_KEY in r and 'step' in r]
    cols = _columns(len(names))
    rows = math.ceil(len(names) / cols)
    width, height = search_curves_figure_size(len(names))
    fig = plt.figure(figsize=(width, height))
    panels_height = rows * ROW_HEIGHT
    grid = fig.add_gridspec(
        2,
        1,
        height_ratios=[TOP_HEIGHT, panels_height],
        left=0.05,
        right=0.99,
        bottom=BOTTOM_MARGIN / height,
        top=1 - HEAD_HEIGHT / height,
        # hspace is relative to the mean row height.
        hspace=TOP_GAP / ((TOP_HEIGHT + panels_height) / 2))
    top = grid[0].subgridspec(1, 5, wspace=0.35)
    _draw_bitops(fig.add_subplot(top[0, :3]), epochs, policies, scalars)
    _draw_mean_bits(fig.add_subplot(top[0, 3:]), epochs, policies, scalars)

    colours = _bit_colours(policies[-1])
    panels = grid[1].subgridspec(rows, cols, hspace=0.75, wspace=0.18)
    for i, name in enumerate(names):
        ax = fig.add_subplot(panels[i // cols, i % cols])
        _draw_layer(ax, name, epochs, policies, colours)
        if i // cols == rows - 1 or i + cols >= len(names):
            ax.set_xlabel('epoch', fontsize=7, labelpad=1)

    fig.suptitle(
        title or 'GMPQ search curves',
        x=0.05,
        y=1 - 0.18 / height,
        ha='left',
        fontsize=13)
    one_hot = [
        e for e, p in zip(epochs, policies) if not p.get('probabilities')
    ]
    note = ('Each layer: probability of every candidate bit width at the end '
            'of each epoch, weights (W) stacked up, activations (A) down; '
            'top right: the chosen bits.')
    if one_hot:
        note += (f'\nEpoch(s) {one_hot}: the file holds no probabilities '
                 f'(older format), the chosen bit width is shown as 1.')
    fig.text(
        0.05,
        1 - 0.5 / height,
        note,
        ha='left',
        va='top',
        fontsize=9,
        color='0.25')
    fig.legend(
        handles=[Patch(color=c, label=f'{b}-bit') for b, c in colours.items()],
        loc='upper right',
        bbox_to_anchor=(0.99, 1 - 0.12 / height),
        ncol=len(colours),
        fontsize=9,
        title='candidate',
        title_fontsize=9,
        frameon=False)
    return fig
