"""Does the GMPQ search beat chance? A seeded study at equal BitOPs.

On the Fashion-MNIST subset shipped in ``data_demo/`` this runs, in one
process (or a few worker processes), every run of the comparison:

1. FP teachers of the slim ResNet-18: all 10 classes, classes 0-4 ("A") and
   classes 5-9 ("B"), each trained from scratch and tested.
2. At each BitOPs budget (midway between uniform WkAk and W(k+1)A(k+1)),
   met exactly through ``target_bitops``: the GMPQ search (attribution on)
   and the same search with ``aw = 0`` (EdMIPS-style), in-domain (search on
   all classes) and for transfer (search on A against the A teacher). With
   the complexity loss against the budget (``cd_mode='budget'``, the
   ``full`` preset) each budget has its own search; with the released,
   budget-blind loss one search per method is exported at every budget.
3. Every policy -- the two searched ones, uniform W2A2/W3A3/W4A4, and
   ``n_random`` random policies drawn over the whole candidate space with
   BitOPs in ``[0.98, 1] x budget`` -- finetuned from the same FP weights
   with each seed and tested: in-domain on all classes, transfer on B from
   the B teacher.

Each finished run writes ``WORK_DIR/runs/<name>/result.json``; a rerun skips
it (resume). Seeds fix every run, and on CPU each worker runs one thread, so
the figures do not depend on ``--workers``. At the end (and with
``--report-only`` from whatever has finished) it writes ``study.md`` (mean,
std and min-max of top-1 per policy; the entropy of each search's final
candidate probabilities) and ``study.png`` (top-1 vs BitOPs, error bars).

The study itself lives in :mod:`gmpq_mm.study` (presets, plan, runner,
report); this is its command line.

Usage::

    python tools/analysis/policy_study.py full --work-dir work_dirs/study
    python tools/analysis/policy_study.py tiny --work-dir /tmp/s --workers 1
"""
import argparse

from gmpq_mm.study.presets import PRESETS, SETTINGS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('preset', choices=sorted(PRESETS))
    parser.add_argument('--work-dir', required=True)
    parser.add_argument(
        '--workers',
        type=int,
        default=1,
        help='worker processes (CPU: one per core)')
    parser.add_argument(
        '--threads',
        type=int,
        default=1,
        help='torch threads per worker on CPU (default 1: '
        'several threads per process were 4x slower on a '
        'loaded 2-core machine)')
    parser.add_argument(
        '--settings',
        nargs='+',
        choices=sorted(SETTINGS),
        default=sorted(SETTINGS),
        help='in_domain and/or transfer (default: both)')
    parser.add_argument(
        '--report-only',
        action='store_true',
        help='write study.md / study.png from the runs '
        'that have finished, run nothing')
    args = parser.parse_args(argv)
    from gmpq_mm.study.runner import make_study, run_study
    study = make_study(args.preset, args.work_dir, args.settings)
    run_study(study, args.workers, args.threads, args.report_only)


if __name__ == '__main__':
    main()
