"""Watch the alphas of one policy-study search from the inside.

Runs one search of ``tools/analysis/policy_study.py`` (a preset's settings,
optionally changed with ``--search``) against a teacher that study has
already trained in ``--work-dir``, and every ``--every`` iterations (and at
the last one) records, before the step, the entropy and top-two gap of the
candidate probabilities, the alpha range, the expected cost over the
budget, and each loss term with the mean gradient it sends to the alphas
(the list: :mod:`gmpq_mm.study.diagnostics`).

It prints one line per record and writes them, with the search's final
entropy and exported policy, to ``WORK_DIR/diagnostics/<tag>.json``.

Usage::

    python tools/analysis/search_diagnostics.py full --work-dir work_dirs/study \\
        --setting transfer --budget 2 --tag lr0.1 \\
        --search '{"arch_optimizer": {"type": "Adam", "lr": 0.1}}'
"""
import argparse
import json
import os.path as osp

from gmpq_mm.study.presets import PRESETS, SETTINGS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('preset', choices=sorted(PRESETS))
    parser.add_argument(
        '--work-dir',
        required=True,
        help='a policy study work dir whose teacher for '
        'the setting has finished')
    parser.add_argument(
        '--setting', choices=sorted(SETTINGS), default='transfer')
    parser.add_argument(
        '--budget',
        type=int,
        default=2,
        help='k: the WkAk-W(k+1)A(k+1) midpoint')
    parser.add_argument('--method', choices=('gmpq', 'aw0'), default='gmpq')
    parser.add_argument(
        '--search',
        default='{}',
        help='JSON dict merged into the preset\'s search '
        'settings')
    parser.add_argument('--every', type=int, default=20)
    parser.add_argument('--tag', default='search')
    args = parser.parse_args(argv)

    from gmpq_mm.study.diagnostics import run_diagnostics
    from gmpq_mm.study.results import result_path
    from gmpq_mm.study.runner import make_study
    study = make_study(args.preset, args.work_dir, [args.setting])
    study['search'] = dict(study['search'], **json.loads(args.search))
    split = SETTINGS[args.setting][0]
    if not osp.isfile(result_path(study, f'teacher_{split}')):
        parser.error(f'no finished teacher_{split} in {args.work_dir}: run '
                     'the study (or its teachers) there first')
    try:
        summary, path = run_diagnostics(
            study,
            args.setting,
            args.budget,
            args.method,
            args.every,
            args.tag,
            log=lambda line: print(line, flush=True))
    except ValueError as e:
        parser.error(str(e))
    print(f"[{args.tag}] final entropy {summary['final_entropy']:.3f}, "
          f"BitOPs {summary['bitops'] / summary['budget']:.3f} of the "
          f"budget, {summary['seconds']:.0f}s; written {path}")


if __name__ == '__main__':
    main()
