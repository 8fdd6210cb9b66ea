"""The fixed policies of a study: uniform WkAk and random ones at each
budget, drawn deterministically, written to ``WORK_DIR/policies/``."""
import os
import os.path as osp

from .configs import base_config

__all__ = ['layer_macs', 'write_policies', 'budget_of']


def budget_of(k, total_macs):
    """BitOPs midway between uniform WkAk and W(k+1)A(k+1)."""
    return (k * k + (k + 1) * (k + 1)) * total_macs // 2


def layer_macs(study):
    """``({searched layer: MACs}, the search backbone)`` at the study's
    resolution."""
    from gmpq_mm.quantization.complexity import count_macs
    from gmpq_mm.quantization.layers import is_mixed_layer
    from gmpq_mm.registry import MODELS
    backbone = MODELS.build(base_config('search').model.backbone.to_dict())
    shape = (1, study['resolution'], study['resolution'])
    macs = count_macs(backbone, shape)
    return {
        n: int(macs[n].macs)
        for n, m in backbone.named_modules() if is_mixed_layer(m)
    }, backbone


def write_policies(study):
    """Uniform and random policies (deterministic): ``({name: path},
    {k: budget BitOPs}, {layer: MACs})``."""
    from gmpq_mm.quantization.budget import (policy_cost,
                                             random_policy_near_budget)
    from gmpq_mm.quantization.policy import make_policy, save_policy
    macs, backbone = layer_macs(study)
    first = next(m for m in backbone.modules() if hasattr(m, 'w_candidates'))
    w_c, a_c = list(first.w_candidates), list(first.a_candidates)
    total = sum(macs.values())
    folder = osp.join(study['work_dir'], 'policies')
    os.makedirs(folder, exist_ok=True)
    paths, budgets = {}, {}

    def save(name, layers, budget=None):
        policy = make_policy(
            layers,
            w_candidates=w_c,
            a_candidates=a_c,
            input_shape=[1, study['resolution'], study['resolution']],
            bitops=policy_cost(macs, layers),
            budget=budget,
            layer_macs=macs,
            source=name)
        paths[name] = save_policy(policy, osp.join(folder, f'{name}.json'))

    for b in study['uniform']:
        save(f'w{b}a{b}', {n: (b, b) for n in macs})
    for k in study['budgets']:
        budget = budget_of(k, total)
        budgets[k] = budget
        for r in range(study['n_random']):
            layers = random_policy_near_budget(
                macs, w_c, a_c, budget, seed=1000 * k + r)
            save(f'b{k}_random{r}', layers, budget)
    return paths, budgets, macs
