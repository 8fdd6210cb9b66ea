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
from typing import Dict, List, Optional

import numpy as np

from .plan import budget_aware

SETTING_TITLES = {
    'in_domain':
    'In-domain (search, finetune and test on all 10 classes)',
    'transfer':
    'Transfer (search on classes 0-4; finetune and test on '
    'classes 5-9 from their own FP model)',
}
SEARCH_LABELS = (('gmpq', 'GMPQ search (attribution on)'),
                 ('aw0', 'same search, aw = 0 (EdMIPS-style)'))


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


def stats(values: List[float]) -> dict:
    """Mean, sample std (0 for one value), min, max and count."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return dict(n=0)
    return dict(
        n=int(arr.size),
        mean=float(arr.mean()),
        std=float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        min=float(arr.min()),
        max=float(arr.max()))


def collect(study: dict, budgets: Dict[int, int]) -> dict:
    """``setting -> dict(teacher, blocks)``; a block is one budget's rows,
    a row ``dict(label, kind, bitops, top1 (list), entropy)``."""
    work, seeds = study['work_dir'], study['seeds']

    def top1s(setting, policy):
        out = []
        for seed in seeds:
            r = _load(work, f'ft_{setting}_{policy}_s{seed}')
            if r is not None:
                out.append(r['top1'])
        return out

    data = {}
    for setting in study.get('settings', list(SETTING_TITLES)):
        search_split, ft_split = (('all', 'all') if setting == 'in_domain' else
                                  ('a', 'b'))
        teachers = {
            s: _load(work, f'teacher_{s}')
            for s in {search_split, ft_split}
        }
        blocks = []
        for k, budget in budgets.items():
            rows = []
            for method, label in SEARCH_LABELS:
                search = _load(work, f'search_{setting}_b{k}_{method}')
                rows.append(
                    dict(
                        label=label,
                        kind=method,
                        bitops=search and search['bitops'],
                        entropy=search and search['entropy'],
                        top1=top1s(setting, f'b{k}_{method}')))
            randoms = []
            for r in range(study['n_random']):
                name = f'b{k}_random{r}'
                randoms.append(
                    dict(
                        label=f'random policy {r}',
                        kind='random',
                        bitops=_policy_bitops(work, name),
                        top1=top1s(setting, name),
                        entropy=None))
            means = [np.mean(r['top1']) for r in randoms if r['top1']]
            pooled = [v for r in randoms for v in r['top1']]
            rows.append(
                dict(
                    label=f"random, {study['n_random']} policies pooled",
                    kind='random_pooled',
                    bitops=None,
                    entropy=None,
                    top1=pooled,
                    policy_means=means))
            rows += randoms
            # the uniform widths next to the budget: the dearest one that
            # fits it and the cheapest one above it
            mid = (k * k + (k + 1)**2) / 2
            below = [b for b in study['uniform'] if b * b <= mid]
            above = [b for b in study['uniform'] if b * b > mid]
            for b in ([max(below)] if below else []) + \
                    ([min(above)] if above else []):
                rows.append(
                    dict(
                        label=f'uniform W{b}A{b}',
                        kind='uniform',
                        bitops=_policy_bitops(work, f'w{b}a{b}'),
                        top1=top1s(setting, f'w{b}a{b}'),
                        entropy=None))
            ft_teacher = teachers[ft_split]
            blocks.append(
                dict(
                    k=k,
                    budget=budget,
                    rows=rows,
                    fp_top1=ft_teacher and ft_teacher['top1']))
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
    if not s['n']:
        return f"| {row['label']} | {cost} | (not run yet) | | | 0 | {ent} |"
    return (f"| {row['label']} | {cost} | {s['mean']:.2f} | {s['std']:.2f} | "
            f"{s['min']:.2f}-{s['max']:.2f} | {s['n']} | {ent} |")


def verdict(block: dict) -> List[str]:
    """The gaps the issue asks about, from the rows of one budget."""
    by = {r['kind']: r for r in block['rows']}
    g, a0 = stats(by['gmpq']['top1']), stats(by['aw0']['top1'])
    pool = by['random_pooled']
    rnd = stats(pool['top1'])
    unif = [
        r for r in block['rows'] if r['kind'] == 'uniform'
        and r['bitops'] is not None and r['bitops'] <= block['budget']
    ]
    lines = []
    if not g['n'] or not rnd['n']:
        return ['- gaps: not enough finished runs yet']
    means = pool['policy_means']
    means_range = float(np.ptp(means)) if len(means) > 1 else 0.0
    # the stricter bar: beyond the pooled std, GMPQ's own std AND the
    # range of the random policies' means (one random draw vs another)
    spread = max(rnd['std'], g['std'], means_range)
    gap = g['mean'] - rnd['mean']
    lines.append(
        f"- GMPQ - random: {gap:+.2f} points (random pooled std "
        f"{rnd['std']:.2f}, GMPQ std {g['std']:.2f}, range of the "
        f"{len(means)} random policies' means {means_range:.2f}): "
        f"{'beats' if gap > spread else 'does NOT beat'} random by more "
        f'than the largest of the three ({spread:.2f})')
    if block.get('fp_top1') is not None:
        # how far random sits below the FP network that every finetune
        # starts from: a policy can hardly win more than that
        head = block['fp_top1'] - rnd['mean']
        lines.append(f"- headroom: FP teacher {block['fp_top1']:.2f} - "
                     f"random mean {rnd['mean']:.2f} = {head:+.2f} points")
    if means:
        above = sum(g['mean'] > m for m in means)
        lines.append(f'- GMPQ mean above {above} of the {len(means)} '
                     "random policies' means (best random policy "
                     f"{max(means):.2f})")
    if unif:
        u = stats(unif[-1]['top1'])
        if u['n']:
            gap_u = g['mean'] - u['mean']
            lines.append(
                f"- GMPQ - {unif[-1]['label']}: {gap_u:+.2f} points "
                f"(std {u['std']:.2f}): "
                f"{'beats' if gap_u > max(u['std'], g['std']) else 'does NOT beat'}"
                ' it by more than the spread')
    if a0['n']:
        gap_a = g['mean'] - a0['mean']
        lines.append(
            f"- attribution on - off: {gap_a:+.2f} points (stds "
            f"{g['std']:.2f} / {a0['std']:.2f}): "
            f"{'on beats off' if gap_a > max(g['std'], a0['std']) else 'no gap beyond the spread'}"
        )
    return lines


def tops(data: dict) -> List[str]:
    """How often each search's mean tops every random policy's mean, and
    how likely that is by chance.

    If a searched policy were one more draw of the random policies
    (exchangeable with them), its mean would be the highest of the ``N + 1``
    with probability ``1 / (N + 1)`` in each block; the blocks are taken as
    independent, so ``X`` tops in ``Y`` blocks has the binomial tail
    ``P(>= X)``. Blocks with a missing run are left out.
    """
    lines = []
    for method, label in SEARCH_LABELS:
        wins = blocks = 0
        n_rand = None
        for d in data.values():
            for block in d['blocks']:
                by = {r['kind']: r for r in block['rows']}
                randoms = [r for r in block['rows'] if r['kind'] == 'random']
                if not by[method]['top1'] or not randoms or \
                        not all(r['top1'] for r in randoms):
                    continue
                mean = float(np.mean(by[method]['top1']))
                wins += all(mean > np.mean(r['top1']) for r in randoms)
                blocks += 1
                n_rand = len(randoms)
        if not blocks:
            continue
        p0 = 1.0 / (n_rand + 1)
        tail = sum(
            math.comb(blocks, i) * p0**i * (1 - p0)**(blocks - i)
            for i in range(wins, blocks + 1))
        lines.append(
            f"- {label}: mean above all {n_rand} random policies' means in "
            f'{wins} of {blocks} blocks; as one more random draw it would do '
            f'that in at least {wins} with probability {tail:.2g}')
    return lines


def _epochs(study: dict) -> str:
    epochs = sorted(set(study['finetune']['epochs'].values()))
    return '/'.join(str(e) for e in epochs)


def expected_runs(study: dict, budgets: Dict[int, int]) -> int:
    """How many ``result.json`` files a finished study has."""
    settings = study.get('settings', list(SETTING_TITLES))
    n_pol = len(study['uniform']) + len(budgets) * (study['n_random'] + 2)
    teachers = 1 if settings == ['in_domain'] else \
        2 if settings == ['transfer'] else 3
    # result files of the searches: one per budget and method, plus the
    # shared search's own when one search serves every budget
    per_method = len(budgets) if len(budgets) == 1 or budget_aware(
        study) else len(budgets) + 1
    return teachers + len(settings) * (2 * per_method +
                                       n_pol * len(study['seeds']))


def write_report(study: dict, budgets: Dict[int, int], macs: Dict[str, int],
                 elapsed: float):
    """Write ``study.md`` and ``study.png``; return their paths."""
    import glob

    from gmpq_mm.quantization.atomic_file import atomic_path
    from gmpq_mm.visualization.study_plot import study_figure

    work = study['work_dir']
    data = collect(study, budgets)
    done = len(glob.glob(osp.join(work, 'runs', '*', 'result.json')))
    total = expected_runs(study, budgets)
    seconds = [
        json.load(open(p)).get('seconds', 0)
        for p in glob.glob(osp.join(work, 'runs', '*', 'result.json'))
    ]
    w_sum = sum(macs.values())
    out = [f"# GMPQ policy study ({study['preset']} preset)", '']
    if done < total:
        out += [f'**PARTIAL: {done} of {total} runs finished.**', '']
    out += [
        f"Fashion-MNIST subset at {study['resolution']}x{study['resolution']}"
        f"; seeds {study['seeds']}; {study['n_random']} random policies per "
        f'budget; finetunes of {_epochs(study)} epoch(s), ranges calibrated '
        f"on {study['calibration_batches']} batch(es); searched layers: "
        f'{len(macs)} convs, '
        f'{w_sum / 1e6:.3f} MMACs. Top-1 in %, BitOPs in millions over the '
        'searched layers (share of the budget in brackets); std is the '
        'sample std over seeds (pooled rows: over every run); entropy is '
        "the search's final candidate entropy, mean over layers of "
        'H(p) / log K (1 = uniform).', '',
        f"Runs: {done}/{total}; compute {sum(seconds) / 60:.1f} min summed "
        f'over runs; this invocation {elapsed / 60:.1f} min wall; '
        f'{platform.processor() or platform.machine()}, '
        f'{platform.system()}.', ''
    ]
    for setting, d in data.items():
        title = SETTING_TITLES[setting]
        out += [f'## {title}', '']
        for split, t in sorted(d['teachers'].items()):
            top1 = 'not run yet' if t is None else f"{t['top1']:.2f}"
            out.append(f'- FP teacher, split `{split}`: top-1 {top1}')
        out.append('')
        for block in d['blocks']:
            k = block['k']
            out += [
                f"### Budget W{k}A{k}-W{k + 1}A{k + 1} midpoint: "
                f"{block['budget'] / 1e6:.3f} M BitOPs", '',
                '| policy | BitOPs (M) | top-1 mean | std | min-max | n | '
                'entropy |', '| --- | --- | --- | --- | --- | --- | --- |'
            ]
            out += [_fmt(row, block['budget']) for row in block['rows']]
            out += [''] + verdict(block) + ['']
    ranks = tops(data)
    if ranks:
        out += ['## Across the blocks', ''] + ranks + ['']
    md = osp.join(work, 'study.md')
    with atomic_path(md, suffix='.md') as tmp:
        with open(tmp, 'w') as f:
            f.write('\n'.join(out) + '\n')
    png = study_figure(data, osp.join(work, 'study.png'))
    return md, png
