"""One run of each kind: an FP teacher, a search, a finetune.

Each function takes the study dict and its own arguments, builds the run's
config (:mod:`.configs`), runs it in this process and returns the dict the
runner writes as the run's ``result.json``.
"""
import os
import os.path as osp

from .configs import base_config, search_config, with_data
from .plan import search_name
from .presets import SETTINGS
from .report import normalised_entropy
from .results import read_result, write_result

__all__ = [
    'run_teacher', 'run_search', 'run_sensitivity', 'run_finetune', 'KINDS'
]


def run_runner(cfg, name, work_dir, seed, test=True):
    """Build an mmengine Runner from ``cfg``, train, and test unless told
    not to; returns ``(runner, test metrics or None)``."""
    from mmengine.runner import Runner
    cfg.work_dir = work_dir
    cfg.experiment_name = name
    cfg.randomness = dict(seed=seed)
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.test() if test else None
    return runner, metrics


def run_teacher(study, split):
    """Train the FP network on ``split`` from scratch; its top-1 and
    final checkpoint."""
    t = study['teacher']
    # one count for every split, or one per split
    epochs = t['epochs'][split] if isinstance(t['epochs'],
                                              dict) else t['epochs']
    cfg = with_data(base_config('pretrain'), study, split)
    cfg.optim_wrapper.optimizer.lr = t['lr']
    cfg.param_scheduler = dict(
        type='CosineAnnealingLR', T_max=epochs, by_epoch=True)
    cfg.train_cfg = dict(by_epoch=True, max_epochs=epochs)
    cfg.default_hooks.checkpoint = dict(
        type='CheckpointHook', interval=epochs, save_last=False)
    work = osp.join(study['work_dir'], 'runs', f'teacher_{split}')
    _, metrics = run_runner(cfg, f'teacher_{split}', work, 0)
    return dict(
        top1=metrics['accuracy/top1'],
        checkpoint=osp.join(work, f'epoch_{epochs}.pth'))


def run_search(study, setting, method, budgets):
    """Search once and export the policy at each of ``budgets`` (``{k:
    BitOPs}``). Each export lands in ``runs/search_<setting>_b<k>_<method>/``
    with its own ``result.json``; with a single budget that is this run's
    own folder."""
    from gmpq_mm.quantization.policy import save_policy
    first = min(budgets)
    cfg = search_config(study, setting, method, budgets[first])
    name = search_name(setting, method, budgets, study)
    work = osp.join(study['work_dir'], 'runs', name)
    runner, _ = run_runner(cfg, name, work, 0, test=False)
    model = runner.model
    out = {}
    for k, budget in sorted(budgets.items()):
        export = f'search_{setting}_b{k}_{method}'
        model.target_bitops = budget
        policy = model.current_policy(source=export)
        folder = osp.join(study['work_dir'], 'runs', export)
        os.makedirs(folder, exist_ok=True)
        path = save_policy(policy, osp.join(folder, 'policy.json'))
        out[k] = dict(
            policy=path,
            bitops=policy['bitops'],
            budget=budget,
            entropy=normalised_entropy(policy),
            search=name)
    if len(budgets) == 1:
        return out[first]
    for k, result in out.items():
        write_result(study, f'search_{setting}_b{k}_{method}', result)
    return dict(exports=sorted(out))


def run_sensitivity(study, setting, k, budget):
    """The training-free baseline at budget ``k`` (``budget`` BitOPs): each
    searched layer's sensitivity to each (w, a) pair, measured on the
    search's data against the search's teacher, and the exact allocation
    of bits at the budget (:mod:`gmpq_mm.apis.sensitivity`). The policy,
    its table and picture land in ``runs/search_<setting>_b<k>_sensitivity``.
    """
    from gmpq_mm.apis.sensitivity import sensitivity_policy
    s = study['sensitivity']
    split = SETTINGS[setting][0]
    cfg = search_config(study, setting, 'gmpq', budget)
    # the FP network as it is: no attribution stages
    cfg.model.backbone.backbone.out_indices = (3, )
    folder = osp.join(study['work_dir'], 'runs',
                      f'search_{setting}_b{k}_sensitivity')
    out = sensitivity_policy(
        cfg,
        read_result(study, f'teacher_{split}')['checkpoint'],
        target_bitops=budget,
        method=s['method'],
        calib_batches=s['calib_batches'],
        work_dir=folder,
        seed=0)
    return dict(
        policy=osp.join(folder, 'policy.json'),
        bitops=out['policy']['bitops'],
        budget=budget,
        entropy=None,
        method=s['method'],
        sensitivity_seconds=round(float(out['seconds']), 1))


def run_finetune(study, setting, policy_name, policy_path, seed):
    """Finetune the FP weights of the setting's finetune split under the
    policy file ``policy_path`` with ``seed``; its top-1."""
    split = SETTINGS[setting][1]
    f = study['finetune']
    epochs = f['epochs'][setting]
    cfg = with_data(base_config('finetune'), study, split)
    cfg.model.backbone.policy = policy_path
    # The reports in docs/studies were measured without the integer
    # runtime's roundings; the comparison of policies does not need them.
    cfg.model.backbone.requant_points = False
    cfg.load_from = read_result(study, f'teacher_{split}')['checkpoint']
    cfg.optim_wrapper.optimizer.lr = f['lr']
    cfg.param_scheduler = dict(
        type='CosineAnnealingLR', T_max=epochs, by_epoch=True)
    cfg.train_cfg = dict(by_epoch=True, max_epochs=epochs)
    if f.get('train_images'):
        # the first N images of the split (mmengine's ``indices``)
        cfg.train_dataloader.dataset.indices = f['train_images']
    name = f'ft_{setting}_{policy_name}_s{seed}'
    work = osp.join(study['work_dir'], 'runs', name)
    _, metrics = run_runner(cfg, name, work, seed)
    return dict(top1=metrics['accuracy/top1'])


KINDS = dict(
    teacher=run_teacher,
    search=run_search,
    sensitivity=run_sensitivity,
    finetune=run_finetune)
