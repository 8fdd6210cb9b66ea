"""The per-layer sensitivity table as markdown (plain Python)."""
from typing import Mapping

__all__ = ['sensitivity_markdown']


def _num(value) -> str:
    return 'n/a' if value is None else f'{float(value):.3g}'


def _trace(row: Mapping, kind: str) -> str:
    """``tr/n`` of a row, with its standard error as a percentage."""
    text = _num(row.get(f'{kind}_trace_per_element'))
    trace, se = row.get(f'{kind}_trace'), row.get(f'{kind}_trace_se')
    if trace and se is not None:
        text += f' ±{100 * se / abs(trace):.0f}%'
    return text


def sensitivity_markdown(table: Mapping) -> str:
    """``sensitivity.md``: the settings, then one row per layer: MACs,
    Hessian traces per element (``'hessian'`` only), the allocated pair
    and the sensitivity of every pair (the allocated one in bold).

    Example:
        >>> table = dict(method='perturbation', pairs=['w2a2', 'w4a4'],
        ...              layers=[dict(name='conv', macs=10, chosen=[4, 4],
        ...                           sensitivity={'w2a2': 0.5,
        ...                                        'w4a4': 0.01})])
        >>> print(sensitivity_markdown(table).splitlines()[-1])
        | conv | 10 | w4a4 | 0.5 | **0.01** |
    """
    pairs = list(table['pairs'])
    hessian = table.get('method') == 'hessian'
    lines = [f"# Sensitivity ({table.get('method')})", '']
    for key, label in (('config', 'config'), ('checkpoint', 'checkpoint'),
                       ('calib_batches',
                        'calibration batches'), ('batch_size', 'batch size'),
                       ('num_samples', 'Hutchinson vectors per batch'),
                       ('calib_method', 'quantizer calibration'),
                       ('base_loss', 'FP loss'), ('target_bitops',
                                                  'BitOPs budget'),
                       ('tolerance', 'tolerance'), ('bitops',
                                                    'BitOPs of the policy'),
                       ('predicted_loss_increase',
                        'predicted loss increase (sum over layers)')):
        if table.get(key) is not None:
            lines.append(f'- {label}: {table[key]}')
    seconds = table.get('seconds')
    if seconds:
        lines.append('- seconds: ' + ', '.join(f'{k} {v:.1f}'
                                               for k, v in seconds.items()))
    lines += [
        '', 'Sensitivity = estimated loss increase with that layer '
        'alone quantized at (w, a); bold: the allocated pair.', ''
    ]
    head = ['layer', 'MACs']
    if hessian:
        head += ['tr(H_W)/n', 'tr(H_x)/n']
    head += ['bits'] + pairs
    lines.append('| ' + ' | '.join(head) + ' |')
    lines.append('|' + '---|' * len(head))
    for row in table['layers']:
        chosen = 'w{}a{}'.format(*row['chosen'])
        cells = [row['name'], str(row['macs'])]
        if hessian:
            cells += [
                _trace(row, 'weight'),
                _trace(row, 'input'),
            ]
        cells.append(chosen)
        for p in pairs:
            text = _num(row['sensitivity'][p])
            cells.append(f'**{text}**' if p == chosen else text)
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'
