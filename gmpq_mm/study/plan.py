"""Which runs a study makes, in dependency order.

A task is ``(study, run name, kind, args)``; ``kind`` names a function of
:data:`gmpq_mm.study.runs.KINDS`. Plain Python: planning builds nothing.
"""
import os.path as osp

from .presets import SETTINGS, SPLITS

__all__ = ['plan', 'budget_aware', 'search_name', 'METHODS']

# the searches of every setting and budget
METHODS = ('gmpq', 'aw0')


def budget_aware(study):
    """True when the search's loss depends on the budget (``cd_mode``
    ``'budget'``): then every budget needs its own search."""
    return study['search'].get('cd_mode', 'reference') == 'budget'


def search_name(setting, method, budgets, study):
    """The run name of a search serving ``budgets`` (``{k: BitOPs}``)."""
    if len(budgets) == 1:
        return f'search_{setting}_b{next(iter(budgets))}_{method}'
    return f'search_{setting}_{method}'


def plan(study, budgets, paths):
    """Task lists in dependency order: teachers; searches; finetunes.

    ``budgets``: ``{k: BitOPs}``; ``paths``: ``{fixed policy: file}``.
    Finetunes go seed by seed, searched policies first, so that a study cut
    short still has every policy at its first seeds.
    """

    def task(name, kind, *args):
        return (study, name, kind, args)

    settings = study['settings']
    splits = [
        s for s in SPLITS if any(s in SETTINGS[name] for name in settings)
    ]
    teachers = [task(f'teacher_{s}', 'teacher', s) for s in splits]
    searches, policies = [], []
    # a budget-blind search (the released linear cost) is run once and
    # exported at every budget; a budget-aware one runs per budget
    groups = [{k: b} for k, b in budgets.items()] if budget_aware(study) \
        else [dict(budgets)]
    for setting in settings:
        for method in METHODS:
            for group in groups:
                searches.append(
                    task(
                        search_name(setting, method, group, study), 'search',
                        setting, method, group))
            for k in budgets:
                name = f'search_{setting}_b{k}_{method}'
                policies.append((setting, f'b{k}_{method}',
                                 osp.join(study['work_dir'], 'runs', name,
                                          'policy.json')))
    for setting in settings:
        policies += [(setting, policy, path) for policy, path in paths.items()]
    finetunes = [
        task(f'ft_{setting}_{policy}_s{seed}', 'finetune', setting, policy,
             path, seed) for seed in study['seeds']
        for setting, policy, path in policies
    ]
    return [teachers, searches, finetunes]
