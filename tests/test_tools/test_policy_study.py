"""tools/analysis/policy_study.py on its tiny preset, and the pieces of
:mod:`gmpq_mm.study` under it."""
import json
import os

import pytest

from gmpq_mm.study.configs import base_config, with_data
from gmpq_mm.study.data import write_split
from gmpq_mm.study.plan import plan
from gmpq_mm.study.policies import write_policies
from gmpq_mm.study.presets import PRESETS, RELEASED_SEARCH
from gmpq_mm.study.runner import execute


def test_tiny_in_domain_study_writes_table_picture_and_resumes(
        tmp_path, run_tool):
    work = tmp_path / 'study'
    cmd = [
        'tools/analysis/policy_study.py', 'tiny', '--work-dir', work,
        '--settings', 'in_domain'
    ]
    out = run_tool(cmd, timeout=600).output
    runs = sorted(p.name for p in (work / 'runs').iterdir())
    # the `all` teacher, GMPQ and aw=0 searches, (W2A2, 1 random, 2
    # searched) policies x 1 seed
    assert len(runs) == 1 + 2 + 4, runs
    assert all((work / 'runs' / r / 'result.json').is_file() for r in runs)
    md = (work / 'study.md').read_text()
    assert 'PARTIAL' not in md and '## Transfer' not in md
    for text in ('## In-domain', '| GMPQ search', '| same search, aw = 0',
                 '| random policy 0', '| uniform W2A2', 'GMPQ - random:',
                 'attribution on - off:', 'FP teacher, split `all`'):
        assert text in md, text
    png = (work / 'study.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10000
    # every searched policy spends 98-100% of its budget
    for method in ('gmpq', 'aw0'):
        r = json.loads((work / 'runs' / f'search_in_domain_b2_{method}' /
                        'result.json').read_text())
        assert 0.98 * r['budget'] <= r['bitops'] <= r['budget']
        assert 0 < r['entropy'] <= 1
    assert 'written:' in out

    # Resume: nothing reruns; a deleted run comes back with the same figure
    # (the runs are seeded).
    ft = work / 'runs' / 'ft_in_domain_b2_random0_s0' / 'result.json'
    before = json.loads(ft.read_text())
    ft.unlink()
    out = run_tool(cmd, timeout=600).output
    assert out.count(': skipped') == len(runs) - 1
    assert 'ft_in_domain_b2_random0_s0: done' in out
    assert json.loads(ft.read_text())['top1'] == before['top1']


@pytest.mark.slow
def test_tiny_study_both_settings(tmp_path, run_tool):
    work = tmp_path / 'study'
    run_tool(['tools/analysis/policy_study.py', 'tiny', '--work-dir', work],
             timeout=1200)
    runs = sorted(p.name for p in (work / 'runs').iterdir())
    assert len(runs) == 3 + 4 + 8, runs
    md = (work / 'study.md').read_text()
    assert 'PARTIAL' not in md
    assert 'FP teacher, split `a`' in md and 'FP teacher, split `b`' in md
    for method in ('gmpq', 'aw0'):
        r = json.loads((work / 'runs' / f'search_transfer_b2_{method}' /
                        'result.json').read_text())
        assert 0.98 * r['budget'] <= r['bitops'] <= r['budget']


def test_partial_report(tmp_path, run_tool):
    """--report-only on a work dir with no finished run says so."""
    work = tmp_path / 'study'
    run_tool([
        'tools/analysis/policy_study.py', 'tiny', '--work-dir', work,
        '--report-only'
    ])
    md = (work / 'study.md').read_text()
    assert '**PARTIAL: 0 of 15 runs finished.**' in md
    assert '(not run yet)' in md
    assert (work / 'study.png').is_file()


def test_stats_by_hand():
    from gmpq_mm.study.report import stats
    s = stats([80.0, 82.0, 84.0])
    assert s == dict(n=3, mean=82.0, std=2.0, min=80.0, max=84.0)
    assert stats([75.0])['std'] == 0.0
    assert stats([]) == dict(n=0)


def test_verdict_reports_gaps():
    from gmpq_mm.study.report import verdict
    block = dict(
        budget=100,
        rows=[
            dict(kind='gmpq', top1=[90.0, 91.0, 92.0], bitops=99),
            dict(kind='aw0', top1=[85.0, 85.0, 85.0], bitops=99),
            dict(
                kind='random_pooled',
                top1=[80.0, 82.0, 84.0],
                policy_means=[81.0, 83.0],
                bitops=None),
            dict(
                kind='uniform',
                label='uniform W2A2',
                top1=[90.0, 92.0],
                bitops=60),
        ])
    lines = '\n'.join(verdict(block))
    # 91 - 82 = 9 > max(pooled std 2, GMPQ std 1, means range 2)
    assert 'GMPQ - random: +9.00 points' in lines
    assert "range of the 2 random policies' means 2.00" in lines
    assert 'beats random by more than the largest of the three (2.00)' \
        in lines
    assert "GMPQ mean above 2 of the 2 random policies' means" in lines
    # 91 - 91 = 0: no win over uniform
    assert 'GMPQ - uniform W2A2: +0.00 points' in lines
    assert 'does NOT beat it' in lines
    assert 'attribution on - off: +6.00 points' in lines
    assert 'on beats off' in lines


def test_verdict_needs_the_gap_beyond_the_random_means_range():
    from gmpq_mm.study.report import verdict

    # four random policies at 84, one at 90 (3 seeds each): the gap 3.0
    # beats the pooled std (2.48) and GMPQ's (0) but not the 6-point range
    # of the random policies' means
    block = dict(
        budget=100,
        rows=[
            dict(kind='gmpq', top1=[88.2, 88.2, 88.2], bitops=99),
            dict(kind='aw0', top1=[], bitops=None),
            dict(
                kind='random_pooled',
                top1=[84.0] * 12 + [90.0] * 3,
                policy_means=[84.0] * 4 + [90.0],
                bitops=None),
        ])
    lines = '\n'.join(verdict(block))
    assert 'GMPQ - random: +3.00 points (random pooled std 2.48' in lines
    assert 'does NOT beat random by more than the largest of the three ' \
        '(6.00)' in lines
    assert "GMPQ mean above 4 of the 5 random policies' means (best random " \
        'policy 90.00)' in lines


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_random_policy_near_budget(seed):
    from gmpq_mm.quantization.budget import (policy_cost,
                                             random_policy_near_budget)
    macs = {
        f'l{i}': m
        for i, m in enumerate([
            147456, 147456, 73728, 147456, 8192, 147456, 147456, 73728, 147456,
            4096, 147456, 147456
        ])
    }
    budget = 6.5 * sum(macs.values())
    policy = random_policy_near_budget(
        macs, [2, 3, 4, 6], [2, 3, 4, 6], budget, seed=seed)
    assert list(policy) == list(macs)
    assert 0.98 * budget <= policy_cost(macs, policy) <= budget
    # deterministic per seed, different across seeds
    assert policy == random_policy_near_budget(
        macs, [2, 3, 4, 6], [2, 3, 4, 6], budget, seed=seed)
    other = random_policy_near_budget(
        macs, [2, 3, 4, 6], [2, 3, 4, 6], budget, seed=seed + 10)
    assert other != policy
    # not a uniform policy: several different pairs
    assert len(set(policy.values())) > 2
    with pytest.raises(ValueError, match='no policy of these 12 layers'):
        random_policy_near_budget(
            macs, [2, 3], [2, 3], 40 * sum(macs.values()), seed=0)


def test_min_bitops_makes_the_policy_spend_the_budget():
    from gmpq_mm.quantization.budget import (best_policy_under_budget,
                                             policy_cost)
    macs = {'a': 100, 'b': 100}
    # both layers prefer 2 bits: the argmax (800 BitOPs) fits 2000
    logp = {n: ([0., -1.], [0., -1.]) for n in macs}
    free = best_policy_under_budget(logp, macs, [2, 4], [2, 4], 2000)
    assert policy_cost(macs, free) == 800
    banded = best_policy_under_budget(
        logp, macs, [2, 4], [2, 4], 2000, min_bitops=1900)
    # only (4, 4) + (2, 2) -> 1600 + 400 = 2000 lies in [1900, 2000]
    assert policy_cost(macs, banded) == 2000
    with pytest.raises(ValueError, match='above the largest reachable'):
        best_policy_under_budget(
            logp, macs, [2, 4], [2, 4], 5000, min_bitops=4000)
    with pytest.raises(ValueError, match='min_bitops 2100 is above'):
        best_policy_under_budget(
            logp, macs, [2, 4], [2, 4], 2000, min_bitops=2100)


def test_study_figure(tmp_path):
    from gmpq_mm.visualization.study_plot import study_figure
    rows = [
        dict(kind='gmpq', top1=[80., 82.], bitops=6e6),
        dict(kind='random', top1=[78., 79.], bitops=5.9e6),
        dict(kind='random_pooled', top1=[78., 79.], bitops=None),
        dict(kind='uniform', top1=[], bitops=4e6)
    ]
    data = {
        s: dict(blocks=[dict(budget=6e6, rows=rows)])
        for s in ('in_domain', 'transfer')
    }
    path = study_figure(data, os.fspath(tmp_path / 'f.png'))
    assert open(path, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


def test_run_configs_skip_yapf_but_stay_loadable(tmp_path):
    """The study's configs are not yapf-formatted (the formatting cost most
    of a short run), and the text mmengine dumps still loads."""
    from mmengine.config import Config

    from gmpq_mm.study.configs import base_config
    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    for name in ('pretrain', 'search', 'finetune'):
        cfg = base_config(name)
        assert cfg._format_python_code is False
        dumped = tmp_path / f'{name}.py'
        cfg.dump(str(dumped))
        again = Config.fromfile(str(dumped))
        assert again.model.to_dict() == cfg.model.to_dict()


def test_plan_one_search_per_budget_only_when_the_loss_sees_it(tmp_path):
    import copy

    from gmpq_mm.study.report import expected_runs
    budgets = {2: 100, 3: 200}
    for mode, searches in (('budget', [
            'search_in_domain_b2_gmpq', 'search_in_domain_b3_gmpq',
            'search_in_domain_b2_aw0', 'search_in_domain_b3_aw0'
    ]), ('reference', ['search_in_domain_gmpq', 'search_in_domain_aw0'])):
        study = copy.deepcopy(PRESETS['tiny'])
        study['search']['cd_mode'] = mode
        study.update(
            settings=['in_domain'], work_dir=str(tmp_path), budgets=[2, 3])
        _, stage2, stage3 = plan(study, budgets, {'w2a2': 'w.json'})
        assert [t[1] for t in stage2] == searches
        # every searched policy is finetuned from its budget's export
        ft = {t[1]: t[3][2] for t in stage3}
        assert ft['ft_in_domain_b3_aw0_s0'].endswith(
            'search_in_domain_b3_aw0/policy.json')
        # the result files: teacher, searches (+ the shared search's own),
        # (1 uniform + 2 x (1 random + 2 searched)) x 1 seed finetunes
        assert expected_runs(study,
                             budgets) == 1 + (4 if mode == 'budget' else 6) + 7


def test_budget_blind_search_is_exported_at_every_budget(tmp_path):
    """The released loss ignores the budget: one search, two exports, each
    with its own result and policy in its budget's folder."""
    import copy
    import json

    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    study = copy.deepcopy(PRESETS['tiny'])
    study['search'] = dict(RELEASED_SEARCH, epochs=2)
    study.update(
        preset='tiny',
        settings=['in_domain'],
        work_dir=str(tmp_path),
        budgets=[2, 3])
    write_split(str(tmp_path / 'data' / 'all'), 'all', 16, 32, 20)
    _, budgets, _ = write_policies(study)
    execute((study, 'teacher_all', 'teacher', ('all', )))
    name, state, _ = execute((study, 'search_in_domain_gmpq', 'search',
                              ('in_domain', 'gmpq', budgets)))
    assert state == 'done'
    shared = json.loads((tmp_path / 'runs' / name / 'result.json').read_text())
    assert shared['exports'] == [2, 3]
    for k, budget in budgets.items():
        r = json.loads((tmp_path / 'runs' / f'search_in_domain_b{k}_gmpq' /
                        'result.json').read_text())
        assert r['budget'] == budget and r['search'] == name
        assert 0.98 * budget <= r['bitops'] <= budget
        policy = json.loads(open(r['policy']).read())
        assert policy['budget'] == budget and policy['bitops'] == r['bitops']


def test_search_diagnostics_records_each_term(tmp_path, run_tool):
    import copy

    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    study = copy.deepcopy(PRESETS['tiny'])
    study.update(preset='tiny', settings=['in_domain'], work_dir=str(tmp_path))
    for split in ('all', ):
        write_split(str(tmp_path / 'data' / split), split, 16, 32, 20)
    execute((study, 'teacher_all', 'teacher', ('all', )))
    out = run_tool([
        'tools/analysis/search_diagnostics.py', 'tiny', '--work-dir', tmp_path,
        '--setting', 'in_domain', '--every', '1', '--tag', 't', '--search',
        '{"temperature": {"start": 1.0, "end": 0.5}}'
    ]).output
    summary = json.loads((tmp_path / 'diagnostics' / 't.json').read_text())
    recs = summary['records']
    # 2 epochs of 1 iteration (16 of the 32 images per part, batch 16)
    assert [r['iter'] for r in recs] == [0, 1]
    first = recs[0]
    assert first['entropy'] == pytest.approx(1.0)  # alphas still uniform
    assert first['gap'] == pytest.approx(0.0, abs=1e-12)
    # uniform candidates expect 3.75 x 3.75 bits: 14.06 / 6.5 of the budget
    assert first['cost_over_budget'] == pytest.approx(
        3.75 * 3.75 / 6.5, rel=1e-3)
    # the budget loss pushes on the alphas; CE and attribution too
    for key in ('loss_cls_grad', 'loss_attr_grad', 'loss_complexity_grad'):
        assert first[key] > 0, key
    assert 0 <= summary['final_entropy'] <= 1
    assert '[t] it    0 T=1.000 entropy 1.000' in out
    assert 'final entropy' in out


def test_verdict_states_the_headroom_below_the_fp_network():
    from gmpq_mm.study.report import verdict
    rows = [
        dict(kind='gmpq', top1=[80.0, 81.0], bitops=99),
        dict(kind='aw0', top1=[], bitops=None),
        dict(
            kind='random_pooled',
            top1=[79.0, 80.0, 81.0],
            policy_means=[79.5, 80.5],
            bitops=None),
    ]
    lines = verdict(dict(budget=100, rows=rows, fp_top1=81.25))
    # 81.25 - mean(79, 80, 81) = 1.25
    assert '- headroom: FP teacher 81.25 - random mean 80.00 = +1.25 ' \
        'points' in lines
    # no teacher result yet: no headroom line
    assert not any('headroom' in s
                   for s in verdict(dict(budget=100, rows=rows)))


def test_full_finetune_calibrates_on_the_presets_batches(tmp_path):
    """`full` finetunes three epochs from ranges calibrated on 16 batches;
    the one-epoch, one-batch finetune of the earlier study stays a preset."""
    import copy

    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    for preset, batches, epochs in (('full', 16, 3), ('full_1epoch_finetune',
                                                      1, 1), ('tiny', 1, 1)):
        study = copy.deepcopy(PRESETS[preset])
        study['work_dir'] = str(tmp_path)
        assert set(study['finetune']['epochs'].values()) == {epochs}
        cfg = with_data(base_config('finetune'), study, 'all')
        hooks = [h for h in cfg.custom_hooks if h['type'] == 'CalibrationHook']
        assert len(hooks) == 1 and hooks[0]['num_batches'] == batches, preset
        assert hooks[0]['bins'] == study['calibration_bins']
    # the searches were not touched by the finetune's change
    assert PRESETS['full']['search'] == \
        PRESETS['full_1epoch_finetune']['search']
    # the counts the study must keep: 2+ budgets, 5+ random policies, 3+
    # seeds (5 since the third study; the second study's preset kept 3)
    full = PRESETS['full']
    assert len(full['budgets']) >= 2 and full['n_random'] >= 5
    assert full['seeds'] == [0, 1, 2, 3, 4]
    assert PRESETS['full_1epoch_finetune']['seeds'] == [0, 1, 2]


def test_tops_counts_blocks_and_gives_the_chance_of_as_many():
    from gmpq_mm.study.report import tops

    def block(gmpq, aw0, randoms):
        rows = [dict(kind='gmpq', top1=gmpq), dict(kind='aw0', top1=aw0)]
        rows += [dict(kind='random', top1=r) for r in randoms]
        return dict(rows=rows)

    rand = [[70.0, 72.0]] * 4 + [[80.0, 80.0]]
    data = dict(
        in_domain=dict(blocks=[
            block([81.0], [79.0], rand),
            block([90.0], [95.0], rand),
        ]),
        # a block with an unfinished random policy is left out
        transfer=dict(blocks=[block([99.0], [99.0], rand[:4] + [[]])]))
    gmpq, aw0 = tops(data)
    # tops both blocks: (1/6)^2 = 0.0278; aw0 one of two: 1 - (5/6)^2
    assert gmpq.endswith("means in 2 of 2 blocks; as one more random draw "
                         'it would do that in at least 2 with probability '
                         '0.028')
    assert aw0.endswith('in 1 of 2 blocks; as one more random draw it would '
                        'do that in at least 1 with probability 0.31')
    assert tops(dict(transfer=data['transfer'])) == []
