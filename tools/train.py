"""Train with an OpenMMLab config: FP teachers, GMPQ searches, finetunes.

Same arguments as mmpretrain's ``tools/train.py``. Additions: paths named by
the config are checked before anything is built, and with no CUDA the
``pytorch`` launcher runs on gloo (``bash tools/dist_train.sh CONFIG 2``
works on a CPU-only machine).
"""
import argparse
import os
import os.path as osp

# Light imports only: --help and argument errors must not wait for torch /
# OpenMMLab, which main() imports once the arguments are parsed.
from gmpq_mm.utils import check_paths, register_all_modules
from gmpq_mm.utils.cli import add_cfg_options
from gmpq_mm.utils.run_guard import restore_work_dir_on_failure


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from the latest checkpoint in the work_dir, or from '
        'the given checkpoint path')
    parser.add_argument(
        '--amp', action='store_true', help='enable automatic mixed precision')
    parser.add_argument(
        '--no-validate',
        action='store_true',
        help='do not evaluate checkpoints during training')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='scale the learning rate by the actual total batch size')
    parser.add_argument(
        '--no-pin-memory', action='store_true', help='no pin_memory')
    parser.add_argument(
        '--no-persistent-workers',
        action='store_true',
        help='no persistent_workers')
    add_cfg_options(parser)
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def _set_loader_flag(cfg, key, value):
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        if cfg.get(name):
            cfg[name][key] = value
    for loader in (cfg.get('train_cfg') or {}).get('dataloaders', {}).values():
        loader[key] = value


def enable_amp(optim_wrapper) -> None:
    """Turn an optim_wrapper config into mmengine's AmpOptimWrapper(s).

    A search config holds one wrapper per optimizer (``weights`` / ``arch``,
    built by SearchOptimWrapperConstructor or an OptimWrapperDict): each of
    them becomes an AmpOptimWrapper; a plain config changes its own type.
    """
    subs = [
        sub for sub in optim_wrapper.values()
        if isinstance(sub, dict) and 'optimizer' in sub
    ]
    for sub in subs or [optim_wrapper]:
        sub['type'] = 'AmpOptimWrapper'
        sub.setdefault('loss_scale', 'dynamic')


def merge_args(cfg, args):
    """Fold command-line arguments into the config (mmpretrain's rules)."""
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    if args.amp:
        import torch
        if not torch.cuda.is_available():
            raise SystemExit('--amp needs CUDA (mmengine AmpOptimWrapper); '
                             'this machine has none')
        enable_amp(cfg.optim_wrapper)
    if args.no_validate:
        cfg.val_cfg = None
        cfg.val_dataloader = None
        cfg.val_evaluator = None
    if args.auto_scale_lr:
        cfg.setdefault('auto_scale_lr', {})['enable'] = True
    if args.no_pin_memory:
        _set_loader_flag(cfg, 'pin_memory', False)
    if args.no_persistent_workers:
        _set_loader_flag(cfg, 'persistent_workers', False)
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    return cfg


def main(argv=None):
    args = parse_args(argv)
    from mmengine.config import Config
    from mmengine.runner import Runner

    from gmpq_mm.utils.cli import fail_in_one_line
    with fail_in_one_line():
        register_all_modules()  # first: it also shims mmengine's look-ups
    from gmpq_mm.engine.hooks import add_exact_resume
    from gmpq_mm.engine.launch import (finish_distributed,
                                       prepare_cpu_distributed)
    from gmpq_mm.utils.bit_record import add_bit_record_hook
    cfg = Config.fromfile(args.config)
    cfg = merge_args(cfg, args)
    phases = ('train', ) if cfg.get('val_cfg') is None else ('train', 'val')
    from gmpq_mm.quantization.budget import BudgetError
    from gmpq_mm.quantization.targets import TargetError
    from gmpq_mm.utils.budget_checks import check_model_budgets
    try:
        check_paths(cfg, phases=phases, config_file=args.config)
        check_model_budgets(cfg)  # budget types, target, policy widths
    except (FileNotFoundError, BudgetError, TargetError) as err:
        raise SystemExit(f'error: {err}')
    add_bit_record_hook(cfg)  # bit widths into / checked against ckpts
    add_exact_resume(cfg)  # a resumed run repeats the uninterrupted one
    prepare_cpu_distributed(cfg)
    with fail_in_one_line(cfg), restore_work_dir_on_failure(cfg):
        try:  # an unreachable budget is found once the model is built
            runner = Runner.from_cfg(cfg)
        except (BudgetError, TargetError) as err:
            raise SystemExit(f'error: {err}')
        runner.train()
    finish_distributed(runner)


if __name__ == '__main__':
    main()
