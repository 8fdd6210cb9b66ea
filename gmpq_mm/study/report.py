"""Table and picture of a policy study from its runs.

Reads ``WORK_DIR/runs/<name>/result.json`` (whatever has finished) and
writes ``WORK_DIR/study.md`` and ``WORK_DIR/study.png``. Nothing here
trains; a missing run is counted and the report says it is partial.
Plain numpy (no torch, no OpenMMLab): the maths of the report can be
checked on hand-made rows.
"""
import json
import math
import os.path as osp
import platform
from typing import Dict, Optional

import numpy as np

from .plan import (budget_aware, budget_per_mac, fixed_policy_names, methods,
                   plan)
from .presets import SETTINGS
from .stats import stats
from .verdict import METHOD_LABELS, ranks, tops, verdict

__all__ = [
    'normalised_entropy', 'collect', 'expected_runs', 'write_report',
    'RANK_TEST'
]

SETTING_TITLES = {
    'in_domain':
    'In-domain (search, finetune and test on all 10 classes)',
    'transfer':
    'Transfer (search on classes 0-4; finetune and test on '
    'classes 5-9 from their own FP model)',
    'small_to_large':
    'Small to large (search on the 5,000-image subset; finetune and test '
    'on the whole Fashion-MNIST, 60,000 / 10,000 images, from an FP model '
    'trained on it)',
}
# stated in the report's header, before any figure
RANK_TEST = (
    "The test, fixed before the runs: in each block, GMPQ's rank r among "
    "the n random policies' mean top-1 (1 = best, a tie counts against "
    'GMPQ); were GMPQ one more random draw, rank r or better has chance '
    'r/(n+1). Across blocks (independent): the chance of as low a rank sum '
    'and the binomial chance of ranking first in as many blocks.')


def normalised_entropy(policy: dict) -> float:
    """Mean over layers and over w/a of H(p) / log K (1 = uniform) of a
    searched policy's ``probabilities``."""
    values = []
    for probs in policy['probabilities'].values():
        for key in ('w', 'a'):
            p = np.asarray(probs[key], dtype=np.float64)
            k = len(p)
            p = p[p > 0]
            values.append(float(-(p * np.log(p)).sum() / math.log(k)))
    return float(np.mean(values))


def _load(work_dir: str, name: str) -> Optional[dict]:
    path = osp.join(work_dir, 'runs', name, 'result.json')
    if not osp.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _policy_bitops(work_dir: str, name: str) -> Optional[int]:
    path = osp.join(work_dir, 'policies', f'{name}.json')
    if not osp.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)['bitops']


def _search_seconds(work: str, result: Optional[dict]) -> Optional[float]:
    """Wall seconds of the run that found a policy (a shared search's own
    when one search was exported at every budget)."""
    if result is None:
        return None
    if 'seconds' not in result and result.get('search'):
        result = _load(work, result['search']) or {}
    return result.get('seconds')


def _method_rows(study, setting, k, top1s):
    rows = []
    for method in methods(study):
        search = _load(study['work_dir'], f'search_{setting}_b{k}_{method}')
        rows.append(
            dict(
                label=METHOD_LABELS[method],
                kind=method,
                bitops=search and search['bitops'],
                entropy=search and search.get('entropy'),
                seconds=_search_seconds(study['work_dir'], search),
                top1=top1s(setting, f'b{k}_{method}')))
    return rows


def _random_rows(study, setting, k, top1s):
    randoms = []
    for r in range(study['n_random']):
        name = f'b{k}_random{r}'
        randoms.append(
            dict(
                label=f'random policy {r}',
                kind='random',
                bitops=_policy_bitops(study['work_dir'], name),
                top1=top1s(setting, name),
                entropy=None))
    means = [np.mean(r['top1']) for r in randoms if r['top1']]
    pooled = [v for r in randoms for v in r['top1']]
    return [
        dict(
            label=f"random, {study['n_random']} policies pooled",
            kind='random_pooled',
            bitops=None,
            entropy=None,
            top1=pooled,
            policy_means=means)
    ] + randoms


def _uniform_rows(study, setting, k, top1s):
    # the uniform widths next to the budget: the dearest one that fits it
    # and the cheapest one above it
    mid = budget_per_mac(k, study)
    below = [b for b in study['uniform'] if b * b <= mid]
    above = [b for b in study['uniform'] if b * b > mid]
    return [
        dict(
            label=f'uniform W{b}A{b}',
            kind='uniform',
            bitops=_policy_bitops(study['work_dir'], f'w{b}a{b}'),
            top1=top1s(setting, f'w{b}a{b}'),
            entropy=None) for b in ([max(below)] if below else []) +
        ([min(above)] if above else [])
    ]


def collect(study: dict, budgets: Dict[int, int]) -> dict:
    """``setting -> dict(teachers, blocks, ...)``; a block is one budget's
    rows, a row ``dict(label, kind, bitops, top1 (list), entropy)`` (the
    methods' rows also ``seconds``)."""
    work, seeds = study['work_dir'], study['seeds']

    def top1s(setting, policy):
        out = []
        for seed in seeds:
            r = _load(work, f'ft_{setting}_{policy}_s{seed}')
            if r is not None:
                out.append(r['top1'])
        return out

    data = {}
    for setting in study['settings']:
        search_split, ft_split = SETTINGS[setting]
        teachers = {
            s: _load(work, f'teacher_{s}')
            for s in {search_split, ft_split}
        }
        blocks = []
        for k, budget in budgets.items():
            rows = _method_rows(study, setting, k, top1s)
            rows += _random_rows(study, setting, k, top1s)
            rows += _uniform_rows(study, setting, k, top1s)
            ft_teacher = teachers[ft_split]
            blocks.append(
                dict(
                    k=k,
                    budget=budget,
                    rows=rows,
                    fp_top1=ft_teacher and ft_teacher['top1'],
                    headroom_bar=study.get('headroom_bar')))
        data[setting] = dict(
            teachers=teachers,
            blocks=blocks,
            search_split=search_split,
            ft_split=ft_split)
    return data


def _fmt(row: dict, budget: int) -> str:
    s = stats(row['top1'])
    bitops = row['bitops']
    cost = '' if bitops is None else \
        f'{bitops / 1e6:.3f} ({100 * bitops / budget:.1f}%)'
    ent = '' if row.get('entropy') is None else f"{row['entropy']:.3f}"
    secs = '' if row.get('seconds') is None else f"{row['seconds']:.0f}"
    if not s['n']:
        return (f"| {row['label']} | {cost} | (not run yet) | | | 0 | {ent} "
                f'| {secs} |')
    return (f"| {row['label']} | {cost} | {s['mean']:.2f} | {s['std']:.2f} | "
            f"{s['min']:.2f}-{s['max']:.2f} | {s['n']} | {ent} | {secs} |")


def _epochs(study: dict) -> str:
    epochs = sorted(set(study['finetune']['epochs'].values()))
    return '/'.join(str(e) for e in epochs)


def expected_runs(study: dict, budgets: Dict[int, int]) -> int:
    """How many ``result.json`` files a finished study has: one per task
    of :func:`gmpq_mm.study.plan.plan`, plus one per budget of each search
    that one run exported at every budget."""
    stages = plan(study, budgets, dict.fromkeys(fixed_policy_names(study)))
    shared = [
        t for t in stages[1]
        if t[2] == 'search' and len(t[3][2]) > 1 and not budget_aware(study)
    ]
    return sum(map(len, stages)) + len(shared) * len(budgets)


def _budget_title(k: int, budget: int, study: dict) -> str:
    head = f'W{k}A{k}-W{k + 1}A{k + 1} midpoint' \
        if k not in study.get('budget_bits', {}) else \
        f'{budget_per_mac(k, study):g} BitOPs per MAC'
    return f'### Budget {head}: {budget / 1e6:.3f} M BitOPs'


def _header(study, macs, done, total, seconds, elapsed):
    data = 'Fashion-MNIST subset' if 'full_data' not in study else \
        'Fashion-MNIST (subset to search, whole set to finetune and test)'
    sens = study.get('sensitivity')
    sens = '' if 'sensitivity' not in methods(study) else (
        f"; sensitivity: {sens['method']} on {sens['calib_batches']} "
        "batch(es) of the search's data against its teacher, bits by an "
        'exact knapsack at the budget')
    return [
        f"{data} at {study['resolution']}x{study['resolution']}; seeds "
        f"{study['seeds']}; {study['n_random']} random policies per budget; "
        f'finetunes of {_epochs(study)} epoch(s), ranges calibrated on '
        f"{study['calibration_batches']} batch(es){sens}; searched layers: "
        f'{len(macs)} convs, {sum(macs.values()) / 1e6:.3f} MMACs. Top-1 in '
        '%, BitOPs in millions over the searched layers (share of the budget '
        'in brackets); std is the sample std over seeds (pooled rows: over '
        "every run); entropy is the search's final candidate entropy, mean "
        'over layers of H(p) / log K (1 = uniform); search s: wall seconds '
        'of the run that found the policy.', '', RANK_TEST, '',
        f'Runs: {done}/{total}; compute {sum(seconds) / 60:.1f} min summed '
        f'over runs; this invocation {elapsed / 60:.1f} min wall; '
        f'{platform.processor() or platform.machine()}, '
        f'{platform.system()}.', ''
    ]


def write_report(study: dict, budgets: Dict[int, int], macs: Dict[str, int],
                 elapsed: float):
    """Write ``study.md`` and ``study.png``; return their paths."""
    import glob

    from gmpq_mm.quantization.atomic_file import atomic_path
    from gmpq_mm.visualization.study_plot import study_figure

    work = study['work_dir']
    data = collect(study, budgets)
    files = glob.glob(osp.join(work, 'runs', '*', 'result.json'))
    done, total = len(files), expected_runs(study, budgets)
    seconds = [json.load(open(p)).get('seconds', 0) for p in files]
    out = [f"# GMPQ policy study ({study['preset']} preset)", '']
    if done < total:
        out += [f'**PARTIAL: {done} of {total} runs finished.**', '']
    out += _header(study, macs, done, total, seconds, elapsed)
    for setting, d in data.items():
        out += [f'## {SETTING_TITLES[setting]}', '']
        for split, t in sorted(d['teachers'].items()):
            top1 = 'not run yet' if t is None else f"{t['top1']:.2f}"
            out.append(f'- FP teacher, split `{split}`: top-1 {top1}')
        out.append('')
        for block in d['blocks']:
            out += [
                _budget_title(block['k'], block['budget'], study), '',
                '| policy | BitOPs (M) | top-1 mean | std | min-max | n | '
                'entropy | search s |',
                '| --- | --- | --- | --- | --- | --- | --- | --- |'
            ]
            out += [_fmt(row, block['budget']) for row in block['rows']]
            out += [''] + verdict(block) + ['']
    across = ranks(data) + tops(data)
    if across:
        out += ['## Across the blocks', ''] + across + ['']
    md = osp.join(work, 'study.md')
    with atomic_path(md, suffix='.md') as tmp:
        with open(tmp, 'w') as f:
            f.write('\n'.join(out) + '\n')
    png = study_figure(data, osp.join(work, 'study.png'))
    return md, png
