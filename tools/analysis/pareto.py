"""Accuracy vs BitOPs of several test results: a table and the Pareto front.

Takes the JSON files ``tools/test.py --out`` writes and prints a markdown
table (name, kind, top-1, BitOPs, size, compression, mean bits) sorted by
BitOPs with the Pareto-optimal rows starred; ``--out-md`` saves it and
``--out-png`` draws top-1 against BitOPs (mixed, uniform and FP32 results
marked differently, the front drawn, every point labelled).

The kind of a result (``FP32``, uniform such as ``W4A4``, or ``mixed``)
comes from, in this order: ``--policy`` (one per result, same order; ``-``
for none), checked against the bits the result was measured with; the
per-layer bits in the result's ``complexity``; the ``quantization`` record
``tools/test.py`` writes; the result's config (its ``model.backbone``
policy or uniform ``w_bits`` / ``a_bits``).

Examples::

    python tools/analysis/pareto.py work_dirs/demo/*_result.json \\
        --out-md pareto.md --out-png pareto.png
    python tools/analysis/pareto.py fp.json w4a4.json mixed.json \\
        --policy - - work_dirs/search/policy.json --bitops total
"""
import argparse
import os.path as osp
import sys

NO_POLICY = '-'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Table and plot of top-1 vs BitOPs of test results, '
        'Pareto front marked')
    parser.add_argument(
        'results', nargs='+', help='JSON files written by tools/test.py --out')
    parser.add_argument(
        '--policy',
        nargs='+',
        help='the policy of each result, in the same order (- for none)')
    parser.add_argument(
        '--names', nargs='+', help='row names (default: result file stems)')
    parser.add_argument(
        '--bitops',
        choices=('searched', 'total'),
        default='searched',
        help='x axis: BitOPs of the searched layers (default; FP32 results '
        'become reference lines) or of the whole network')
    parser.add_argument('--out-md', help='write the markdown table here')
    parser.add_argument('--out-png', help='write the plot here')
    parser.add_argument('--title', help='plot title')
    return parser.parse_args(argv)


def default_names(paths):
    """File stems, or paths without extension where stems repeat."""
    stems = [osp.splitext(osp.basename(p))[0] for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [osp.splitext(osp.normpath(p))[0] for p in paths]


def summary_from_config(result, result_path):
    """The ``quantization`` record of an older result, from its config."""
    from mmengine.config import Config

    from gmpq_mm.utils.cli import register_for_tool
    from gmpq_mm.utils.quantization_summary import quantization_summary

    config = result.get('config')
    if not config or not osp.isfile(config):
        raise ValueError(
            f'{result_path}: cannot tell its bits: no per-layer bits in '
            f'"complexity", no "quantization" record, and its config '
            f'{config!r} is not found; pass --policy')
    register_for_tool()  # before parsing: mmengine's look-up shims
    return quantization_summary(Config.fromfile(config).get('model'))


def result_bits(result, result_path, policy_path):
    """``(bits, kind)`` of one result: the ``(w, a)`` of its quantized
    layers (None if unknown) and a kind that overrides the bits' own."""
    from gmpq_mm.quantization.policy import policy_layers
    from gmpq_mm.visualization.pareto_table import compare_bits, measured_bits

    measured = measured_bits(result)
    if policy_path is not None:
        bits = policy_layers(policy_path)
        if measured is not None:
            compare_bits(bits, measured, policy_path, result_path)
        return list(bits.values()), None
    if measured is not None:
        return list(measured.values()), None
    if 'quantization' in result:
        summary = result['quantization']
    else:
        summary = summary_from_config(result, result_path)
    if not summary:
        return None, 'FP32'
    if summary.get('backbone') == 'MixedPrecisionBackbone':
        return None, 'supernet'
    policy = summary.get('policy')
    if policy is not None:
        try:
            return list(policy_layers(policy).values()), None
        except FileNotFoundError as err:
            raise ValueError(f'{result_path}: was tested with {err}; pass '
                             f'--policy') from None
    return [(summary['w_bits'], summary['a_bits'])], None


def _fail(message):
    print(f'error: {message}', file=sys.stderr)
    return 1


def main(argv=None):
    args = parse_args(argv)
    from gmpq_mm.quantization.atomic_file import write_text_atomic
    from gmpq_mm.visualization.figure_io import save_figure
    from gmpq_mm.visualization.pareto_plot import pareto_figure
    from gmpq_mm.visualization.pareto_table import (load_result,
                                                    markdown_table, result_row,
                                                    sort_rows)

    policies = args.policy or [NO_POLICY] * len(args.results)
    if len(policies) != len(args.results):
        return _fail(f'--policy gives {len(policies)} policies for '
                     f'{len(args.results)} results (one each, - for none)')
    names = args.names or default_names(args.results)
    if len(names) != len(args.results):
        return _fail(f'--names gives {len(names)} names for '
                     f'{len(args.results)} results')

    # Everything is read and checked before anything is written.
    rows = []
    for path, policy, name in zip(args.results, policies, names):
        try:
            result = load_result(path)
            bits, kind = result_bits(result, path,
                                     None if policy == NO_POLICY else policy)
        except (ValueError, FileNotFoundError) as err:
            return _fail(str(err))
        rows.append(result_row(name, result, bits, kind))
    rows = sort_rows(rows, args.bitops)
    table = markdown_table(rows, args.bitops)
    figure = None
    if args.out_png:
        figure = pareto_figure(rows, args.bitops, title=args.title)

    print(table, end='')
    if figure is not None:
        save_figure(figure, args.out_png)
        print(f'written: {args.out_png}')
    if args.out_md:
        write_text_atomic(args.out_md, table)
        print(f'written: {args.out_md}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
