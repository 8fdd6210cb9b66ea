"""Evaluate a checkpoint with an OpenMMLab config.

Prints the metrics mmengine computes (top-1/top-5) and, for quantized or
mixed-precision models, their BitOPs, size and compression; ``--out`` writes
all of it as JSON, with the policy file or uniform bits the model was built
with (key ``quantization``, see ``gmpq_mm.utils.quantization_summary``).
"""
import argparse
import json
import os
import os.path as osp

# Light imports only: --help and argument errors must not wait for torch /
# OpenMMLab, which main() imports once the arguments are parsed.
from gmpq_mm.utils import check_paths, register_all_modules
from gmpq_mm.utils.cli import add_cfg_options
from gmpq_mm.utils.run_guard import restore_work_dir_on_failure


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test a checkpoint')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save logs')
    parser.add_argument(
        '--out', help='write the metrics (and complexity) to this JSON file')
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


def main(argv=None):
    args = parse_args(argv)
    from mmengine.config import Config
    from mmengine.runner import Runner

    from gmpq_mm.utils.cli import fail_in_one_line
    with fail_in_one_line():
        register_all_modules()  # first: it also shims mmengine's look-ups
    from gmpq_mm.engine.launch import (finish_distributed,
                                       prepare_cpu_distributed)
    from gmpq_mm.utils.bit_record import add_bit_record_hook
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    cfg.resume = False
    # Only the test split and the checkpoint matter here.
    for key in ('train_dataloader', 'train_cfg', 'optim_wrapper',
                'param_scheduler', 'val_dataloader', 'val_cfg',
                'val_evaluator'):
        cfg[key] = None
    try:
        check_paths(cfg, phases=('test', ), config_file=args.config)
    except FileNotFoundError as err:
        raise SystemExit(f'error: {err}')
    add_bit_record_hook(cfg)  # bit widths into / checked against ckpts
    prepare_cpu_distributed(cfg)
    with fail_in_one_line(cfg), restore_work_dir_on_failure(cfg):
        runner = Runner.from_cfg(cfg)
        metrics = runner.test()
    # Which policy / uniform bits were tested, for tools/analysis/pareto.py.
    from gmpq_mm.utils.quantization_summary import quantization_summary
    result = dict(
        config=args.config,
        checkpoint=args.checkpoint,
        metrics=metrics,
        quantization=quantization_summary(cfg.model))
    from gmpq_mm.utils.report import model_complexity
    complexity = model_complexity(runner.model, cfg)
    accuracy = ', '.join(f'{k} {v:.2f}' for k, v in metrics.items()
                         if k.startswith('accuracy'))
    if complexity is not None:
        result['complexity'] = complexity
        accuracy += (
            ' | BitOPs {bitops_quantized:.4g} G (quantized layers), '
            '{bitops_total:.4g} G (whole net), size {size_mb:.3f} MB, '
            'compression {compression:.2f}x'.format(**complexity))
    runner.logger.info(f'result: {accuracy}')
    if args.out and runner.rank == 0:
        from gmpq_mm.quantization.atomic_file import write_text_atomic
        write_text_atomic(args.out, json.dumps(result, indent=2) + '\n')
        runner.logger.info(f'results written to {args.out}')
    finish_distributed(runner)


if __name__ == '__main__':
    main()
