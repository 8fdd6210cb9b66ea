"""Plot how a search went: BitOPs over the iterations and every layer's
candidate probabilities over the epochs.

Reads a search's work_dir: ``policy_epoch_<N>.json`` (``PolicyExportHook``,
one a epoch) and the training scalars mmengine logged to
``<timestamp>/vis_data/scalars.json`` (the supernet's expected BitOPs and
mean bits; every run of the work_dir, joined in timestamp order, a resumed
run replacing what the runs before it logged from its first step on).
Works on a search that is still running, after its first epoch.

Policy files written before the probabilities were exported show each
layer's chosen bit width as probability 1 (the figure says so).

Examples::

    python tools/visualization/plot_search_curves.py work_dirs/search
    python tools/visualization/plot_search_curves.py work_dirs/demo/search \\
        --layers 'layer4.*' layer1.0.conv1 --out curves.png
"""
import argparse
import os.path as osp
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Search curves of a GMPQ search work_dir: expected '
        'BitOPs and each layer\'s candidate probabilities per epoch')
    parser.add_argument(
        'work_dir', help='the search\'s work_dir (policy_epoch_<N>.json)')
    parser.add_argument(
        '--out', help='PNG to write (default: WORK_DIR/search_curves.png)')
    parser.add_argument(
        '--layers',
        nargs='+',
        metavar='NAME',
        help='layers to draw: names or shell patterns such as '
        '\'layer4.*\' (default: all searched layers)')
    parser.add_argument('--title', help='figure title')
    parser.add_argument(
        '--dpi', type=int, default=100, help='pixels per inch (default 100)')
    return parser.parse_args(argv)


def _fail(message):
    print(f'error: {message}', file=sys.stderr)
    return 1


def main(argv=None):
    args = parse_args(argv)
    from gmpq_mm.visualization.figure_io import save_figure
    from gmpq_mm.visualization.search_curves import draw_search_curves
    from gmpq_mm.visualization.search_history import load_search_history

    try:
        history = load_search_history(args.work_dir)
        fig = draw_search_curves(
            history.epochs,
            history.policies,
            history.scalars,
            layers=args.layers,
            title=args.title or f'search curves: {args.work_dir}')
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))
    out = args.out or osp.join(args.work_dir, 'search_curves.png')
    save_figure(fig, out, dpi=args.dpi)

    first, last = history.epochs[0], history.epochs[-1]
    print(f'policies: {len(history.epochs)} epoch files '
          f'(epochs {first}..{last}) in {args.work_dir}')
    missing = [
        e for e, p in zip(history.epochs, history.policies)
        if not p.get('probabilities')
    ]
    if missing:
        print(f'note: epoch(s) {missing} hold no probabilities (older '
              f'policy format): their chosen bit widths are drawn as 1')
    if history.scalars:
        steps = [r['step'] for r in history.scalars]
        print(f'scalars: {len(steps)} training lines, iterations '
              f'{steps[0]}..{steps[-1]}, from '
              f'{len(history.scalar_files)} run(s)')
    else:
        print(f'scalars: none under {args.work_dir}/*/vis_data/'
              f'scalars.json; BitOPs drawn from the policies only')
    print(f'written: {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
