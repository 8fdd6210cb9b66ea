"""Watch the alphas of one policy-study search from the inside.

Runs one search of ``tools/analysis/policy_study.py`` (a preset's settings,
optionally changed with ``--search``) against a teacher that study has
already trained in ``--work-dir``, and every ``--every`` iterations (and at
the last one) records, before the step:

- ``entropy`` / ``entropy_min``: mean and least ``H(p) / log K`` over the
  layers' weight and activation probabilities (1 = uniform);
- ``gap`` / ``gap_max``: mean and largest gap between the two most likely
  candidates;
- ``alpha_range``: largest minus smallest alpha;
- ``cost_over_budget``: expected BitOPs under the probabilities / budget;
- for each loss term (``loss_cls``, ``loss_attr``, ``loss_complexity``)
  its value and the mean absolute gradient it sends to the alphas, on that
  iteration's batch.

It prints one line per record and writes them, with the search's final
entropy and exported policy, to ``WORK_DIR/diagnostics/<tag>.json``.

Usage::

    python tools/analysis/search_diagnostics.py full --work-dir work_dirs/study \\
        --setting transfer --budget 2 --tag lr0.1 \\
        --search '{"arch_optimizer": {"type": "Adam", "lr": 0.1}}'
"""
import argparse
import copy
import json
import math
import os
import os.path as osp
import sys
import time

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import policy_study as study_tool  # noqa: E402

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('preset', choices=sorted(study_tool.PRESETS))
    parser.add_argument(
        '--work-dir',
        required=True,
        help='a policy study work dir whose teacher for '
        'the setting has finished')
    parser.add_argument(
        '--setting', choices=sorted(study_tool.SETTINGS), default='transfer')
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

    study = copy.deepcopy(study_tool.PRESETS[args.preset])
    study.update(
        preset=args.preset,
        settings=[args.setting],
        work_dir=osp.abspath(args.work_dir))
    study['search'] = dict(study['search'], **json.loads(args.search))
    split = study_tool.SETTINGS[args.setting][0]
    if not osp.isfile(study_tool.result_path(study, f'teacher_{split}')):
        parser.error(f'no finished teacher_{split} in {args.work_dir}: run '
                     'the study (or its teachers) there first')
    study_tool.init_worker(1)
    _, budgets, _ = study_tool.write_policies(study)
    if args.budget not in budgets:
        parser.error(f'--budget {args.budget} is not one of the preset\'s '
                     f'{sorted(budgets)}')
    budget = budgets[args.budget]
    cfg = study_tool.search_config(study, args.setting, args.method, budget)
    records = []
    out_dir = osp.join(study['work_dir'], 'diagnostics')
    os.makedirs(out_dir, exist_ok=True)

    def log(rec):
        print(f'[{args.tag}] ' + format_record(rec), flush=True)

    start = time.time()
    from mmengine.runner import Runner
    cfg.work_dir = osp.join(out_dir, args.tag)
    cfg.randomness = dict(seed=0)
    runner = Runner.from_cfg(cfg)
    runner.register_hook(make_hook(args.every, records, log))
    runner.train()
    policy = runner.model.current_policy(source=args.tag)
    summary = dict(
        tag=args.tag,
        preset=args.preset,
        setting=args.setting,
        budget=budget,
        method=args.method,
        search=study['search'],
        final_entropy=study_tool.normalised_entropy(policy),
        bitops=policy['bitops'],
        records=records,
        layers={
            n: [v['w_bits'], v['a_bits']]
            for n, v in policy['layers'].items()
        },
        seconds=round(time.time() - start, 1))
    path = osp.join(out_dir, f'{args.tag}.json')
    with open(path, 'w') as f:
        json.dump(summary, f, indent=1)
    print(f"[{args.tag}] final entropy {summary['final_entropy']:.3f}, "
          f"BitOPs {policy['bitops'] / budget:.3f} of the budget, "
          f"{summary['seconds']:.0f}s; written {path}")


if __name__ == '__main__':
    main()
