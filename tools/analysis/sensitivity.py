"""Per-layer quantization sensitivity and a bit policy at a budget.

Measures each searchable layer's sensitivity to each (w, a) candidate of a
search config on a few training batches, with the full-precision
checkpoint of that network, and allocates bits at exactly the budget (the
policy's BitOPs, and / or its model size, in ``[(1 - tolerance) * B, B]``)
by an exact multiple-choice knapsack: a training-free baseline to a GMPQ
search.
``docs/user_guides/sensitivity.md`` says what is computed.

Writes into ``--work-dir``: ``policy.json`` (a standard policy file, as a
search writes; finetune configs read it), ``sensitivity.json`` and
``sensitivity.md`` (the per-layer table) and ``sensitivity.png``.

Examples::

    python tools/analysis/sensitivity.py \\
        configs/gmpq/demo/search_r18_fashion_mnist.py \\
        work_dirs/demo/pretrain/epoch_3.pth --target-bitops 300e6
    python tools/analysis/sensitivity.py CONFIG CKPT --target-bitops 1.2e9 \\
        --method perturbation --calib-batches 8 --work-dir work_dirs/sens
"""
import argparse
import os.path as osp
import sys

from gmpq_mm.utils.cli import add_cfg_options

METHODS = ('hessian', 'perturbation')
CALIB_METHODS = ('release', 'kl', 'mse', 'max')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Per-layer quantization sensitivity and the bit policy '
        'of least total sensitivity within a BitOPs budget')
    parser.add_argument(
        'config', help='search config (MixedPrecisionBackbone model)')
    parser.add_argument(
        'checkpoint', help='full-precision checkpoint of that network')
    parser.add_argument(
        '--target-bitops',
        type=float,
        help='BitOPs budget of the searchable layers, e.g. 300e6')
    parser.add_argument(
        '--target-size-mb',
        type=float,
        help='model-size budget in MB (1e6 bytes), counted as the search '
        'counts it; with --target-bitops the policy meets both')
    parser.add_argument(
        '--tolerance',
        type=float,
        default=0.02,
        help='each budget B is met in [(1 - tolerance) * B, B] '
        '(default 0.02)')
    parser.add_argument(
        '--method',
        choices=METHODS,
        default='hessian',
        help='hessian: Hutchinson trace x squared quantization error '
        '(default); perturbation: quantize each layer alone and measure '
        'the loss')
    parser.add_argument(
        '--calib-batches',
        type=int,
        default=4,
        help='training batches to measure on (default 4)')
    parser.add_argument(
        '--num-samples',
        type=int,
        default=8,
        help='Hutchinson vectors per batch (hessian; default 8)')
    parser.add_argument(
        '--calib-method',
        choices=CALIB_METHODS,
        default='release',
        help='quantizer thresholds / ranges, as the finetune calibrates '
        '(default release)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--work-dir',
        help='output folder (default work_dirs/sensitivity/<config name>)')
    add_cfg_options(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    work_dir = args.work_dir or osp.join(
        'work_dirs', 'sensitivity',
        osp.splitext(osp.basename(args.config))[0])
    from gmpq_mm.apis.sensitivity import sensitivity_policy
    try:
        out = sensitivity_policy(
            args.config,
            args.checkpoint,
            target_bitops=args.target_bitops,
            target_size_mb=args.target_size_mb,
            tolerance=args.tolerance,
            method=args.method,
            calib_batches=args.calib_batches,
            num_samples=args.num_samples,
            calib_method=args.calib_method,
            work_dir=work_dir,
            seed=args.seed,
            cfg_options=args.cfg_options)
    except (ValueError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    table = out['table']
    seconds = table['seconds']
    print(f"method: {table['method']} on {table['calib_batches']} x "
          f"{table['batch_size']} training images")
    for key, value, budget in (('BitOPs', f"{table['bitops']:,}",
                                table['target_bitops']),
                               ('size', f"{table['size_mb']:.6g} MB",
                                table['target_size_mb'])):
        limit = 'no budget' if budget is None else f'budget {budget:g}'
        print(f'{key}: {value} ({limit}, tolerance {table["tolerance"]})')
    print(f"predicted loss increase: {table['predicted_loss_increase']:.4g} "
          f"(FP loss {table['base_loss']:.4g})")
    print('seconds: ' + ', '.join(f'{k} {v:.1f}' for k, v in seconds.items()))
    for path in out['files']:
        print(f'written: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
