"""Per-layer bit widths of a policy, with each layer's share of the cost.

One pair of bars per searched layer (weight bits, activation bits), in
network order, and in a panel below each layer's share of the searched
layers' MACs (what BitOPs scale with) and of their weights (what the size
scales with): a researcher sees at once whether the bits went where the
cost is. The title carries the totals: BitOPs, size of the searched
layers' weights at their bits, and both compressions against FP32.

Pure: a loaded policy dict and ``name -> int`` mappings in, a matplotlib
Figure out; nothing from mmengine.
"""
from typing import Mapping, Optional, Tuple

from gmpq_mm.quantization.complexity import FP_BITS, MB, bitops
from .figure_io import plt, whole_pixels

__all__ = [
    'policy_totals', 'format_bitops', 'policy_figure_size', 'policy_figure'
]

W_COLOR = '#1f77b4'
A_COLOR = '#ff7f0e'
MACS_COLOR = '#555555'
PARAMS_COLOR = '#2ca02c'
GROUP_SHADE = '#f0f0f0'
# Bit values are written on the bars up to this many layers; beyond it
# they would overlap and the y ticks (the candidates) say it well enough.
MAX_ANNOTATED_LAYERS = 32


def _counts(mapping: Mapping, layers: Mapping, what: str) -> dict:
    missing = [name for name in layers if name not in mapping]
    if missing:
        raise ValueError(f'no {what} for layer(s) {missing[:5]}'
                         f'{" ..." if len(missing) > 5 else ""}')
    return {name: int(mapping[name]) for name in layers}


def policy_totals(policy: Mapping, layer_macs: Mapping,
                  layer_params: Mapping) -> dict:
    """BitOPs, size and compression of a policy's layers.

    Args:
        policy: A loaded policy (``layers``: ``name -> {'w_bits',
            'a_bits'}``).
        layer_macs: ``name -> MACs`` of each layer for one sample.
        layer_params: ``name -> weight count`` of each layer.

    Returns:
        dict: ``num_layers``, ``macs``, ``params``, ``bitops`` (sum of
        ``MACs * w_bits * a_bits``), ``fp_bitops`` (the same layers at
        32 x 32), ``bitops_compression``, ``size_mb`` (weights at their
        bits, MB of 1e6 bytes as everywhere in gmpq_mm), ``fp_size_mb``,
        ``size_compression``, ``mean_w_bits`` / ``mean_a_bits`` (plain mean
        over layers).
    """
    layers = policy['layers']
    macs = _counts(layer_macs, layers, 'MACs')
    params = _counts(layer_params, layers, 'weight count')
    total_macs = sum(macs.values())
    total_params = sum(params.values())
    ops = bitops(macs, layers)
    fp_ops = total_macs * FP_BITS * FP_BITS
    size_bits = sum(params[name] * entry['w_bits']
                    for name, entry in layers.items())
    fp_size_bits = total_params * FP_BITS
    return dict(
        num_layers=len(layers),
        macs=total_macs,
        params=total_params,
        bitops=ops,
        fp_bitops=fp_ops,
        bitops_compression=fp_ops / ops if ops else None,
        size_mb=size_bits / 8 / MB,
        fp_size_mb=fp_size_bits / 8 / MB,
        size_compression=fp_size_bits / size_bits if size_bits else None,
        mean_w_bits=sum(e['w_bits'] for e in layers.values()) / len(layers),
        mean_a_bits=sum(e['a_bits'] for e in layers.values()) / len(layers))


def format_bitops(value: float) -> str:
    """BitOPs in the largest unit that keeps the number above 0.1:
    ``121241600 -> '0.121 G'``, ``5e7 -> '50 M'``."""
    for unit, scale in (('T', 1e12), ('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(value) >= 0.1 * scale:
            return f'{value / scale:.3g} {unit}'
    return f'{value:.3g}'


def _ratio(value: Optional[float]) -> str:
    return 'n/a' if value is None else f'{value:.1f}x'


def policy_figure_size(num_layers: int) -> Tuple[float, float]:
    """``(width, height)`` in inches: wide enough for ``num_layers`` bar
    pairs with their rotated names (about 1/3 inch a layer)."""
    return whole_pixels(max(10.0, 3.0 + 0.32 * num_layers)), 6.5


def _group_of(name: str) -> str:
    """The stage a layer belongs to (``'layer2'`` of ``'layer2.0.conv1'``)."""
    return name.split('.', 1)[0]


def _shade_groups(ax, names) -> None:
    """Alternate light bands behind consecutive layers of one stage."""
    groups = [_group_of(name) for name in names]
    if len(set(groups)) in (1, len(groups)):
        return  # one stage, or every layer its own: bands would say nothing
    start, shaded = 0, False
    for i in range(1, len(groups) + 1):
        if i == len(groups) or groups[i] != groups[start]:
            if shaded:
                ax.axvspan(start - 0.5, i - 0.5, color=GROUP_SHADE, zorder=0)
            start, shaded = i, not shaded


def _bit_ticks(policy: Mapping, w_bits, a_bits):
    ticks = set(w_bits) | set(a_bits)
    for key in ('w_candidates', 'a_candidates'):
        ticks |= set(policy.get(key) or ())
    return sorted(ticks)


def policy_figure(policy: Mapping,
                  layer_macs: Mapping,
                  layer_params: Mapping,
                  title: Optional[str] = None):
    """Grouped bars of a policy's weight / activation bits per layer.

    Args:
        policy: A loaded policy (see :func:`policy_totals`).
        layer_macs / layer_params: ``name -> int`` for every policy layer.
        title: First title line (e.g. the policy file); the second line
            holds the totals.

    Returns:
        matplotlib.figure.Figure: Of :func:`policy_figure_size`; save it
        with :func:`gmpq_mm.visualization.figure_io.save_figure`.
    """
    totals = policy_totals(policy, layer_macs, layer_params)
    names = list(policy['layers'])
    w_bits = [policy['layers'][n]['w_bits'] for n in names]
    a_bits = [policy['layers'][n]['a_bits'] for n in names]
    macs_share = [
        100.0 * layer_macs[n] / totals['macs'] if totals['macs'] else 0.0
        for n in names
    ]
    params_share = [
        100.0 * layer_params[n] / totals['params'] if totals['params'] else 0.0
        for n in names
    ]
    n = len(names)
    xs = list(range(n))
    small = n > MAX_ANNOTATED_LAYERS

    fig, (ax, share) = plt.subplots(
        2,
        1,
        sharex=True,
        figsize=policy_figure_size(n),
        layout='constrained',
        gridspec_kw=dict(height_ratios=(2, 1)))
    width = 0.4
    left = [x - width / 2 for x in xs]
    right = [x + width / 2 for x in xs]

    _shade_groups(ax, names)
    w_bars = ax.bar(
        left, w_bits, width, color=W_COLOR, label='weight bits', zorder=2)
    a_bars = ax.bar(
        right, a_bits, width, color=A_COLOR, label='activation bits', zorder=2)
    if n <= MAX_ANNOTATED_LAYERS:
        for bars in (w_bars, a_bars):
            ax.bar_label(bars, fontsize=7, padding=1)
    ticks = _bit_ticks(policy, w_bits, a_bits)
    ax.set_yticks(ticks)
    ax.set_ylim(0, max(ticks) * 1.12)
    ax.set_ylabel('bits')
    ax.grid(axis='y', color='#dddddd', linewidth=0.6)
    ax.set_axisbelow(True)
    # Above the axes: inside, the legend would hide the tallest bars.
    ax.legend(
        loc='lower left',
        bbox_to_anchor=(0, 1.0),
        ncol=2,
        fontsize=8.5,
        frameon=False,
        borderaxespad=0.2)

    # The cost side in its own panel, so no line runs across the bars.
    _shade_groups(share, names)
    share.bar(
        left,
        macs_share,
        width,
        color=MACS_COLOR,
        label='share of MACs (BitOPs scale with it)',
        zorder=2)
    share.bar(
        right,
        params_share,
        width,
        color=PARAMS_COLOR,
        label='share of weights (size scales with it)',
        zorder=2)
    share.set_ylabel('% of searched\nlayers')
    share.grid(axis='y', color='#dddddd', linewidth=0.6)
    share.set_axisbelow(True)
    share.legend(
        loc='upper left', ncol=2, fontsize=8, frameon=True, framealpha=0.9)
    top = max(macs_share + params_share + [1e-9])
    share.set_ylim(0, top * 1.3)  # head room for the legend
    share.set_xticks(xs)
    share.set_xticklabels(
        names,
        rotation=90,
        fontsize=7 if small else 8.5,
        fontfamily='monospace')
    share.set_xlim(-0.6, n - 0.4)

    lines = [
        title or 'bit-width policy',
        f'{n} searched layers  |  BitOPs {format_bitops(totals["bitops"])} '
        f'({_ratio(totals["bitops_compression"])} less than FP32)  |  '
        f'mean bits W {totals["mean_w_bits"]:.2f} / A '
        f'{totals["mean_a_bits"]:.2f}',
        f'weights {totals["size_mb"]:.3g} MB at their bits '
        f'({_ratio(totals["size_compression"])} smaller than FP32, '
        f'{totals["fp_size_mb"]:.3g} MB)',
    ]
    fig.suptitle('\n'.join(lines), fontsize=10)
    return fig
