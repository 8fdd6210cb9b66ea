"""Test results side by side: their kind, cost, the Pareto front, a table.

Reads the JSON ``tools/test.py --out`` writes (``metrics`` with
``accuracy/top1``; ``complexity`` with BitOPs in G, size in MB and, per
conv / linear layer, the bits the tested model really ran with) and turns
each into one row: top-1, BitOPs of the searched layers and of the whole
network, size, compression, mean bits and its kind (``FP32``, uniform such
as ``W4A4``, or ``mixed``). A row is Pareto-optimal when no other row has
at most its BitOPs and at least its top-1, one of them strictly.

Pure: stdlib only.
"""
import json
import os
import os.path as osp
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    'METRICS', 'load_result', 'measured_bits', 'compare_bits', 'bits_kind',
    'kind_group', 'result_row', 'pareto_optimal', 'sort_rows', 'markdown_table'
]

TOP1 = 'accuracy/top1'
# x-axis choices: BitOPs of the searched (quantized) layers, what papers
# report, or of the whole network (layers kept FP counted at 32 x 32).
METRICS = {
    'searched': ('bitops_searched', 'compression_searched',
                 'BitOPs of the searched layers'),
    'total': ('bitops_total', 'compression_total',
              'BitOPs of the whole network (FP layers at 32x32)'),
}
COMPLEXITY_KEYS = ('bitops_quantized', 'bitops_total', 'size_mb',
                   'compression')
Bits = Tuple[int, int]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_result(path: str) -> dict:
    """Read and check one test result JSON.

    Raises:
        FileNotFoundError / ValueError: Naming ``path``, for a missing or
            unreadable file, malformed JSON, no numeric
            ``metrics['accuracy/top1']``, or a ``complexity`` without the
            figures ``tools/test.py`` writes.
    """
    path = os.fspath(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'result file not found: {path}')
    try:
        with open(path, encoding='utf-8') as f:
            result = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f'{path}: malformed JSON at line {e.lineno} column '
                         f'{e.colno}: {e.msg}') from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f'{path}: cannot read it: {e}') from None
    if not isinstance(result, dict):
        raise ValueError(f'{path}: a test result must be a JSON object, got '
                         f'{type(result).__name__}')
    metrics = result.get('metrics')
    if not isinstance(metrics, Mapping) or not _is_number(metrics.get(TOP1)):
        raise ValueError(f'{path}: no "metrics" with a number "{TOP1}" (is '
                         f'it the --out JSON of tools/test.py?)')
    complexity = result.get('complexity')
    if complexity is not None:
        if not isinstance(complexity, Mapping):
            raise ValueError(f'{path}: "complexity" must be an object')
        bad = [
            k for k in COMPLEXITY_KEYS if k not in complexity
            or not (_is_number(complexity[k]) or complexity[k] is None)
        ]
        if bad:
            raise ValueError(f'{path}: "complexity" lacks numbers for {bad}')
    return result


def measured_bits(result: Mapping) -> Optional[Dict[str, Bits]]:
    """``name -> (w_bits, a_bits)`` of the layers the tested model
    quantized, from ``complexity.layers`` (names without the leading
    ``backbone.``, as in policies); None if the result has no layer rows."""
    rows = (result.get('complexity') or {}).get('layers')
    if not isinstance(rows, list):
        return None
    bits = {}
    for row in rows:
        if isinstance(row, Mapping) and row.get('quantized'):
            name = str(row['name'])
            if name.startswith('backbone.'):
                name = name[len('backbone.'):]
            bits[name] = (row['w_bits'], row['a_bits'])
    return bits


def compare_bits(policy_bits: Mapping, measured: Mapping, policy_path: str,
                 result_path: str) -> None:
    """A ValueError naming both files when a policy is not what the
    result was measured with (e.g. ``--policy`` given in another order)."""
    for name, (w_bits, a_bits) in policy_bits.items():
        if name not in measured:
            raise ValueError(f'{policy_path}: layer {name} was not quantized '
                             f'in {result_path}: not the policy of that '
                             f'result (give --policy in the order of the '
                             f'results)')
        if tuple(measured[name]) != (w_bits, a_bits):
            w_meas, a_meas = measured[name]
            raise ValueError(f'{policy_path}: layer {name} is W{w_bits}A'
                             f'{a_bits} but {result_path} was measured at '
                             f'W{w_meas}A{a_meas}: not the policy of that '
                             f'result (give --policy in the order of the '
                             f'results)')
    extra = [name for name in measured if name not in policy_bits]
    if extra:
        raise ValueError(f'{policy_path}: lacks layer(s) {extra[:3]} that '
                         f'{result_path} quantized: not the policy of that '
                         f'result')


def bits_kind(bits: Optional[Sequence[Bits]]) -> str:
    """``'FP32'`` (no quantized layer), ``'W4A4'`` (every layer the same
    weight bits and the same activation bits) or ``'mixed'``."""
    bits = list(bits or ())
    if not bits:
        return 'FP32'
    w_set = {w for w, _ in bits}
    a_set = {a for _, a in bits}
    if len(w_set) == 1 and len(a_set) == 1:
        return f'W{bits[0][0]}A{bits[0][1]}'
    return 'mixed'


def kind_group(kind: str) -> str:
    """``'fp'``, ``'mixed'`` or ``'uniform'`` of a :func:`bits_kind`."""
    if kind == 'FP32':
        return 'fp'
    return 'mixed' if kind in ('mixed', 'supernet') else 'uniform'


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def result_row(name: str,
               result: Mapping,
               bits: Optional[Sequence[Bits]] = None,
               kind: Optional[str] = None) -> dict:
    """One table row of a loaded result.

    Args:
        name: The row's name.
        result: From :func:`load_result`.
        bits: ``(w_bits, a_bits)`` of each quantized layer (None or empty:
            full precision).
        kind: Overrides :func:`bits_kind` (e.g. ``'W4A4'`` known from a
            config without the layer list).
    """
    c = result.get('complexity') or {}
    kind = kind or bits_kind(bits)
    fp = kind == 'FP32'
    bits = list(bits or ())
    searched = None if fp else c.get('bitops_quantized')
    comp_searched = c.get('compression_quantized')
    if comp_searched is None and not fp and c.get('fp_bitops_quantized') \
            and searched:
        comp_searched = c['fp_bitops_quantized'] / searched
    return dict(
        name=name,
        kind=kind,
        group=kind_group(kind),
        top1=float(result['metrics'][TOP1]),
        bitops_searched=searched,
        bitops_total=c.get('bitops_total'),
        compression_searched=1.0 if fp else comp_searched,
        compression_total=c.get('compression'),
        size_mb=c.get('size_mb'),
        mean_w_bits=_mean(w
                          for w, _ in bits) if bits else c.get('mean_w_bits'),
        mean_a_bits=_mean(a
                          for _, a in bits) if bits else c.get('mean_a_bits'))


def pareto_optimal(
        points: Sequence[Tuple[Optional[float], float]]) -> List[bool]:
    """Which ``(cost, accuracy)`` points no other point dominates.

    A point with ``cost`` None is never optimal (and dominates nothing).
    Identical points are optimal together.
    """
    flags = []
    for i, (cost, acc) in enumerate(points):
        if cost is None:
            flags.append(False)
            continue
        dominated = any(
            j != i and c is not None and c <= cost and a >= acc and (
                c < cost or a > acc) for j, (c, a) in enumerate(points))
        flags.append(not dominated)
    return flags


def sort_rows(rows: Sequence[Mapping], metric: str = 'searched') -> list:
    """Rows by the metric's BitOPs (rows without it last), flagged
    ``pareto``."""
    key = METRICS[metric][0]
    flags = pareto_optimal([(r[key], r['top1']) for r in rows])
    rows = [dict(r, pareto=f) for r, f in zip(rows, flags)]
    return sorted(
        rows, key=lambda r: (r[key] is None, r[key] or 0.0, -r['top1']))


def _num(value, fmt: str) -> str:
    return '–' if value is None else format(value, fmt)


def markdown_table(rows: Sequence[Mapping], metric: str = 'searched') -> str:
    """A markdown table of :func:`sort_rows` output, with a legend."""
    _, comp_key, label = METRICS[metric]
    scope = 'searched' if metric == 'searched' else 'whole net'
    header = ('Pareto', 'name', 'kind', 'top-1 (%)', 'BitOPs searched (G)',
              'BitOPs whole net (G)', 'size (MB)', f'compression ({scope})',
              'mean W / A bits')
    lines = [
        '| ' + ' | '.join(header) + ' |',
        '|' + '|'.join([':---:', ':---', ':---'] + ['---:'] * 6) + '|'
    ]
    for r in rows:
        bits = ('–' if r['mean_w_bits'] is None else
                f'{r["mean_w_bits"]:.2f} / {r["mean_a_bits"]:.2f}')
        comp = r[comp_key]
        cells = ('★' if r['pareto'] else '',
                 f'**{r["name"]}**' if r['pareto'] else r['name'], r['kind'],
                 f'{r["top1"]:.2f}', _num(r['bitops_searched'],
                                          '.4g'), _num(r['bitops_total'],
                                                       '.4g'),
                 _num(r['size_mb'],
                      '.4g'), '–' if comp is None else f'{comp:.2f}x', bits)
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines += [
        '', f'Sorted by {label} (G); ★ Pareto-optimal in top-1 vs these '
        f'BitOPs. BitOPs whole net: layers kept FP at 32x32. Compression: '
        f'FP32 BitOPs / BitOPs of the same layers. Size: whole model, '
        f'weights at their bits, MB = 1e6 bytes. Mean bits: plain mean '
        f'over the quantized layers.'
    ]
    return '\n'.join(lines) + '\n'
