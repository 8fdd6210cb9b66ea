"""Top-1 against BitOPs for several test results, with the Pareto front.

Mixed-precision, uniform and FP32 results get their own marker; the
Pareto-optimal ones a black ring, joined by the front as a staircase (with
the BitOPs of a step one can have at least its accuracy). A result without
BitOPs on the chosen axis (an FP32 model when the axis is the searched
layers) is drawn as a horizontal reference line at its top-1.

Pure: rows from :func:`gmpq_mm.visualization.pareto_table.sort_rows` in,
a matplotlib Figure out; nothing from mmengine.
"""
from typing import Optional, Sequence

from matplotlib.ticker import FuncFormatter
from matplotlib.transforms import Bbox

from .figure_io import plt
from .pareto_table import METRICS

__all__ = ['PARETO_FIGSIZE', 'pareto_figure']

PARETO_FIGSIZE = (9.0, 6.0)
STYLES = {
    'mixed': dict(marker='o', color='#d62728', label='mixed precision'),
    'uniform': dict(marker='s', color='#1f77b4', label='uniform bits'),
    'fp': dict(marker='^', color='#7f7f7f', label='FP32'),
}


def _label(row) -> str:
    if row['group'] == 'mixed' and row['mean_w_bits'] is not None:
        return (f'{row["name"]}\nW{row["mean_w_bits"]:.2f} / '
                f'A{row["mean_a_bits"]:.2f}')
    if row['group'] == 'uniform':
        return f'{row["name"]} ({row["kind"]})'
    return row['name']


# Where a label may go, in points from its marker: the four diagonals close
# by, then farther up / down. The first spot that overlaps no marker, no
# label placed before and stays inside the axes wins.
LABEL_SPOTS = ((7, 5), (7, -5), (-7, 5), (-7, -5), (7, 20), (7, -20), (-7, 20),
               (-7, -20), (7, 35), (7, -35), (-7, 35), (-7, -35))
MARKER_RADIUS_PX = 7


def _place_labels(fig, ax, xy, texts) -> None:
    """Annotate each point with its text where it collides least."""
    fig.canvas.draw()  # settle the layout: positions are final from here
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = [ax.get_legend().get_window_extent(renderer)
             ] if ax.get_legend() else []
    for x, y in xy:
        px, py = ax.transData.transform((x, y))
        r = MARKER_RADIUS_PX
        taken.append(Bbox.from_extents(px - r, py - r, px + r, py + r))
    for (x, y), text in zip(xy, texts):
        chosen = None
        for dx, dy in LABEL_SPOTS:
            note = ax.annotate(
                text, (x, y),
                xytext=(dx, dy),
                textcoords='offset points',
                fontsize=8,
                ha='left' if dx > 0 else 'right',
                va='bottom' if dy > 0 else 'top')
            box = note.get_window_extent(renderer).padded(2)
            inside = (
                box.x0 >= frame.x0 and box.x1 <= frame.x1
                and box.y0 >= frame.y0 and box.y1 <= frame.y1)
            if inside and not any(box.overlaps(t) for t in taken):
                chosen = box
                break
            note.remove()
        if chosen is None:  # crowded: the first spot, overlapping
            dx, dy = LABEL_SPOTS[0]
            note = ax.annotate(
                text, (x, y),
                xytext=(dx, dy),
                textcoords='offset points',
                fontsize=8,
                ha='left',
                va='bottom')
            chosen = note.get_window_extent(renderer)
        taken.append(chosen)


def pareto_figure(rows: Sequence,
                  metric: str = 'searched',
                  title: Optional[str] = None):
    """Scatter of top-1 vs BitOPs (G) with the Pareto front.

    Args:
        rows: Rows with ``pareto`` flags (``sort_rows``).
        metric: ``'searched'`` or ``'total'`` (see ``METRICS``).
        title: Figure title.

    Returns:
        matplotlib.figure.Figure: Of ``PARETO_FIGSIZE``.
    """
    key, _, label = METRICS[metric]
    points = [r for r in rows if r[key] is not None]
    references = [r for r in rows if r[key] is None]

    fig, ax = plt.subplots(figsize=PARETO_FIGSIZE, layout='constrained')
    for group, style in STYLES.items():
        mine = [r for r in points if r['group'] == group]
        if not mine:
            continue
        ax.scatter(
            [r[key] for r in mine], [r['top1'] for r in mine],
            s=70,
            zorder=3,
            marker=style['marker'],
            color=style['color'],
            label=style['label'],
            edgecolors=['black' if r['pareto'] else 'none' for r in mine],
            linewidths=1.6)
    front = sorted((r for r in points if r['pareto']),
                   key=lambda r: (r[key], r['top1']))
    for i, row in enumerate(references):
        ax.axhline(
            row['top1'],
            color=STYLES['fp']['color'],
            linestyle=':',
            linewidth=1.2,
            zorder=1,
            label='top-1 of FP32 / uncounted results' if i == 0 else None)
        ax.annotate(
            f'{row["name"]} ({row["kind"]}): {row["top1"]:.2f}%',
            (0.01, row['top1']),
            xycoords=('axes fraction', 'data'),
            xytext=(0, 3),
            textcoords='offset points',
            fontsize=8,
            color='#555555')

    xs = [r[key] for r in points]
    if xs and min(xs) > 0 and max(xs) / min(xs) > 10:
        ax.set_xscale('log')
    tops = [r['top1'] for r in rows]
    pad = max(1.0, 0.12 * (max(tops) - min(tops)))
    ax.set_ylim(min(tops) - pad, max(tops) + pad)
    if xs:
        lo, hi = min(xs), max(xs)
        if ax.get_xscale() == 'log':
            ax.set_xlim(lo / 1.6, hi * 1.6)
        else:
            span = (hi - lo) or max(hi, 1e-9)
            ax.set_xlim(max(0.0, lo - 0.15 * span), hi + 0.15 * span)
    if front:
        # The staircase runs on to the right edge: with more BitOPs one can
        # still have the best accuracy found (and a lone point shows a line).
        ax.plot(
            [r[key] for r in front] + [ax.get_xlim()[1]],
            [r['top1'] for r in front] + [front[-1]['top1']],
            color='black',
            linestyle='--',
            linewidth=1.0,
            drawstyle='steps-post',
            zorder=2,
            label='Pareto front (ringed points)')
    if ax.get_xscale() == 'log':
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:g}'))
    ax.set_xlabel(f'{label} (G)')
    ax.set_ylabel('top-1 accuracy (%)')
    ax.grid(color='#e0e0e0', linewidth=0.6)
    ax.set_axisbelow(True)
    ax.legend(loc='lower right', fontsize=8.5, framealpha=0.9)
    ax.set_title(title or 'top-1 vs BitOPs', fontsize=11)
    _place_labels(fig, ax, [(r[key], r['top1']) for r in points],
                  [_label(r) for r in points])
    return fig
