"""Export a finetuned checkpoint as a packed low-bit safetensors artifact.

    python tools/deploy/export.py CONFIG CHECKPOINT --out model.safetensors

Weights of the quantized layers are stored as integers packed at their bit
widths with their thresholds / scales, activation ranges and signedness;
everything else (stem, BatchNorm, classifier) in FP; the policy and the
model config in the metadata, with checksums (see
``gmpq_mm/quantization/export.py``). By default the network is then rebuilt
from the artifact alone and its logits compared with the checkpoint's.
Prints the file size next to the complexity report's model size; ``--json``
writes that summary.

Load it again with ``gmpq_mm.apis.build_deployed_model(PATH)``.
"""
import argparse
import json
import os.path as osp
import time

from gmpq_mm.utils.cli import DictAction


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export a checkpoint as a packed low-bit artifact')
    parser.add_argument('config', help='config file of the checkpoint')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--out', required=True, help='the .safetensors artifact to write')
    parser.add_argument(
        '--no-verify',
        action='store_true',
        help='do not rebuild the network from the artifact and compare '
        'its logits with the checkpoint\'s')
    parser.add_argument(
        '--input-shape',
        type=int,
        nargs='+',
        help='C H W (or H W) for the complexity report and the check; '
        'default the config\'s test crop')
    parser.add_argument('--json', help='write the summary to this JSON file')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value (xxx=yyy format)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mmengine.config import Config

    from gmpq_mm.apis import export_checkpoint
    from gmpq_mm.utils import check_paths, register_all_modules
    register_all_modules()

    for path, what in ((args.config, 'config'),
                       (args.checkpoint, 'checkpoint')):
        if not osp.isfile(path):
            raise SystemExit(f'error: {what} file not found: {path}')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    try:  # the policy file, if the model names one
        check_paths(cfg, phases=(), config_file=args.config)
    except FileNotFoundError as err:
        raise SystemExit(f'error: {err}')
    start = time.time()
    summary = export_checkpoint(
        cfg,
        args.checkpoint,
        args.out,
        verify=not args.no_verify,
        input_shape=args.input_shape)
    summary['seconds'] = time.time() - start
    lines = [
        f'artifact written to {summary["path"]}: {summary["bytes"]} bytes '
        f'({summary["size_mb"]:.3f} MB), {summary["num_tensors"]} tensors, '
        f'{summary["packed_layers"]} packed layers'
    ]
    if 'model_size_mb' in summary:
        c = summary['complexity']
        lines.append(
            f'model size from the complexity report: '
            f'{summary["model_size_mb"]:.3f} MB (file / report = '
            f'{summary["size_ratio"]:.3f}); BitOPs (quantized layers) '
            f'{c["bitops_quantized"]:.4g} G, compression '
            f'{c["compression"]:.2f}x at input '
            f'{tuple(summary["input_shape"])}')
    if 'max_abs_diff' in summary:
        lines.append('rebuilt from the artifact: max |logits - '
                     f'checkpoint logits| = {summary["max_abs_diff"]:.3g}')
    lines.append(f'done in {summary["seconds"]:.2f} s')
    print('\n'.join(lines))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == '__main__':
    main()
