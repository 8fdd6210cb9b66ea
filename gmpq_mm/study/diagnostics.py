"""Watch the alphas of one study search from the inside.

:func:`run_diagnostics` runs one search of a study (its preset's settings,
optionally changed) against a teacher the study has already trained, and
every ``every`` iterations (and at the last one) records, before the step:

- ``entropy`` / ``entropy_min``: mean and least ``H(p) / log K`` over the
  layers' weight and activation probabilities (1 = uniform);
- ``gap`` / ``gap_max``: mean and largest gap between the two most likely
  candidates;
- ``alpha_range``: largest minus smallest alpha;
- ``cost_over_budget``: expected BitOPs under the probabilities / budget;
- for each loss term (``loss_cls``, ``loss_attr``, ``loss_complexity``)
  its value and the mean absolute gradient it sends to the alphas, on that
  iteration's batch.
"""
import json
import math
import os
import os.path as osp
import time

from .configs import search_config
from .policies import write_policies
from .report import normalised_entropy
from .runner import init_worker

__all__ = ['alpha_record', 'format_record', 'run_diagnostics']

TERMS = ('loss_cls', 'loss_attr', 'loss_complexity')


def alpha_record(model, data_batch, iteration):
    """The figures of the module docstring for one batch."""
    import torch
    arch = model.arch_parameters()
    # this extra forward must not move the BatchNorm running statistics
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    data = model.data_preprocessor(data_batch, True)
    losses = model.loss(data['inputs'], data['data_samples'])
    rec = dict(iter=iteration)
    for key in TERMS:
        value = losses[key]
        grad = 0.0
        if torch.is_tensor(value) and value.requires_grad:
            grads = torch.autograd.grad(
                value, arch, retain_graph=True, allow_unused=True)
            flat = [g.flatten() for g in grads if g is not None]
            grad = float(torch.cat(flat).abs().mean()) if flat else 0.0
        rec[key] = float(value)
        rec[key + '_grad'] = grad
    ents, gaps = [], []
    with torch.no_grad():
        for _, m in model.mixed_layers:
            for p in m.probs():
                p = p.double()
                ents.append(
                    float(-(p * p.clamp_min(1e-300).log()).sum() /
                          math.log(len(p))))
                top = torch.topk(p, 2).values
                gaps.append(float(top[0] - top[1]))
        alphas = torch.cat([a.flatten() for a in arch])
        rec.update(
            entropy=sum(ents) / len(ents),
            entropy_min=min(ents),
            gap=sum(gaps) / len(gaps),
            gap_max=max(gaps),
            alpha_range=float(alphas.max() - alphas.min()),
            temperature=float(model.mixed_layers[0][1].temperature),
            cost_over_budget=float(model.expected_bitops()) /
            model.target_bitops)
    del losses
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    model.zero_grad(set_to_none=True)
    return rec


def make_hook(every, records, log):
    from mmengine.hooks import Hook

    class AlphaDiagnosticsHook(Hook):
        priority = 'LOWEST'

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            i = runner.iter
            if i % every and i != runner.max_iters - 1:
                return
            model = runner.model
            model = getattr(model, 'module', model)
            rec = alpha_record(model, data_batch, i)
            records.append(rec)
            log(rec)

    return AlphaDiagnosticsHook()


def format_record(rec):
    terms = ' '.join(f"{k[5:]}={rec[k]:.4g} |g|={rec[k + '_grad']:.2e}"
                     for k in TERMS)
    return (f"it {rec['iter']:4d} T={rec['temperature']:.3f} entropy "
            f"{rec['entropy']:.3f} (min {rec['entropy_min']:.3f}) gap "
            f"{rec['gap']:.3f} (max {rec['gap_max']:.3f}) alpha range "
            f"{rec['alpha_range']:.3f} E/B {rec['cost_over_budget']:.3f} | " +
            terms)


def run_diagnostics(study, setting, budget_k, method, every, tag, log=print):
    """Run the search of ``setting`` / ``method`` at budget ``budget_k``
    with an alpha hook; write ``WORK_DIR/diagnostics/<tag>.json`` (the
    records, final entropy, policy) and return ``(summary, path)``.

    The study's teacher for the setting must have finished, and
    ``budget_k`` must be one of its budgets (``ValueError`` otherwise)."""
    init_worker(1)
    _, budgets, _ = write_policies(study)
    if budget_k not in budgets:
        raise ValueError(f'--budget {budget_k} is not one of the preset\'s '
                         f'{sorted(budgets)}')
    budget = budgets[budget_k]
    cfg = search_config(study, setting, method, budget)
    records = []
    out_dir = osp.join(study['work_dir'], 'diagnostics')
    os.makedirs(out_dir, exist_ok=True)

    def log_record(rec):
        log(f'[{tag}] ' + format_record(rec))

    start = time.time()
    from mmengine.runner import Runner
    cfg.work_dir = osp.join(out_dir, tag)
    cfg.randomness = dict(seed=0)
    runner = Runner.from_cfg(cfg)
    runner.register_hook(make_hook(every, records, log_record))
    runner.train()
    policy = runner.model.current_policy(source=tag)
    summary = dict(
        tag=tag,
        preset=study['preset'],
        setting=setting,
        budget=budget,
        method=method,
        search=study['search'],
        final_entropy=normalised_entropy(policy),
        bitops=policy['bitops'],
        records=records,
        layers={
            n: [v['w_bits'], v['a_bits']]
            for n, v in policy['layers'].items()
        },
        seconds=round(time.time() - start, 1))
    path = osp.join(out_dir, f'{tag}.json')
    with open(path, 'w') as f:
        json.dump(summary, f, indent=1)
    return summary, path
