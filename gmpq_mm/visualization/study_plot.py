"""Top-1 vs BitOPs of the policy study, one panel per setting."""
from typing import Mapping

import numpy as np

from .figure_io import plt, save_figure

__all__ = ['study_figure']

STYLE = {
    'gmpq': dict(color='tab:red', marker='*', ms=12, label='GMPQ search'),
    'aw0': dict(color='tab:blue', marker='D', ms=7, label='search, aw = 0'),
    'random': dict(color='0.55', marker='o', ms=5, label='random policy'),
    'uniform': dict(color='k', marker='s', ms=6, label='uniform'),
}


def study_figure(data: Mapping, path: str) -> str:
    """``data`` as :func:`gmpq_mm.study.report.collect` returns it:
    mean top-1 with min-max error bars over seeds, per policy."""
    fig, axes = plt.subplots(1, len(data), figsize=(6 * len(data), 4.5))
    axes = np.atleast_1d(axes)
    for ax, (setting, d) in zip(axes, data.items()):
        seen = set()
        for block in d['blocks']:
            ax.axvline(block['budget'] / 1e6, color='0.85', lw=1, zorder=0)
            for row in block['rows']:
                style = STYLE.get(row['kind'])
                if style is None or not row['top1'] or \
                        row['bitops'] is None:
                    continue
                top1 = np.asarray(row['top1'])
                mean = top1.mean()
                err = [[mean - top1.min()], [top1.max() - mean]]
                kw = dict(style)
                if kw['label'] in seen:
                    kw['label'] = None
                seen.add(style['label'])
                ax.errorbar(
                    row['bitops'] / 1e6,
                    mean,
                    yerr=err,
                    ls='none',
                    capsize=3,
                    **kw)
        ax.set_title(setting.replace('_', '-'))
        ax.set_xlabel('BitOPs of the searched layers (M)')
        ax.set_ylabel('top-1 (%), mean and min-max over seeds')
        ax.grid(alpha=0.3)
        if seen:
            ax.legend(fontsize=8, loc='lower right')
    fig.tight_layout()
    return save_figure(fig, path)
