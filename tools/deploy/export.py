"""Export a finetuned checkpoint as a packed low-bit safetensors artifact,
or as a QDQ ONNX model (the format is chosen by the suffix of ``--out``).

    python tools/deploy/export.py CONFIG CHECKPOINT --out model.safetensors
    python tools/deploy/export.py CONFIG CHECKPOINT --out model.onnx

Weights of the quantized layers are stored as integers packed at their bit
widths with their thresholds / scales, activation ranges and signedness;
everything else (stem, BatchNorm, classifier) in FP; the policy and the
model config in the metadata, with checksums (see
``gmpq_mm/quantization/export.py``). By default the network is then rebuilt
from the artifact alone and its logits compared with the checkpoint's.
Prints the file size next to the complexity report's model size; ``--json``
writes that summary.

Load it again with ``gmpq_mm.apis.build_deployed_model(PATH)``.

``.onnx``: a standard ONNX model (opset 17, dynamic batch, no custom ops),
the weights int8 codes on their b-bit grid. ``--onnx-mode integer`` (the
default) writes the graph onnxruntime's CPU provider runs on integer
kernels (``QLinearConv``: BatchNorm folded, each quantized conv's output
requantized, residual adds quantized to 8 bits with ranges from
``--calib-images`` training images); ``--onnx-mode float-qdq`` writes
QuantizeLinear / DequantizeLinear around float Conv / Gemm, the PyTorch
function exactly (explicit quantization as TensorRT reads it). See
``gmpq_mm/deploy/``. Needs ``onnx`` and ``onnxruntime``
(``pip install "gmpq_mm[deploy]"``). Unless ``--no-verify``, onnxruntime
(CPU) runs it beside the PyTorch checkpoint before it is written; a search
or full-precision checkpoint, or any failed check, stops with an error and
leaves nothing at ``--out``.
"""
import argparse
import json
import os.path as osp
import time

from gmpq_mm.utils.cli import add_cfg_options


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export a checkpoint as a packed low-bit artifact')
    parser.add_argument('config', help='config file of the checkpoint')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--out',
        required=True,
        help='the file to write: .onnx for a QDQ ONNX model, otherwise a '
        '.safetensors artifact')
    parser.add_argument(
        '--no-verify',
        action='store_true',
        help='do not rebuild the network from the artifact (.onnx: run '
        'it in onnxruntime) and compare its logits with the checkpoint\'s')
    parser.add_argument(
        '--input-shape',
        type=int,
        nargs='+',
        help='C H W (or H W) for the complexity report and the check; '
        'default the config\'s test crop')
    parser.add_argument(
        '--onnx-mode',
        choices=['integer', 'float-qdq'],
        default='integer',
        help='.onnx: integer (onnxruntime runs QLinearConv; default) or '
        'float-qdq (Q/DQ around float convs, as TensorRT reads it)')
    parser.add_argument(
        '--calib-images',
        type=int,
        default=64,
        help='.onnx integer: training images (test pipeline) that set the '
        'ranges of the 8-bit points and run the check (default 64)')
    parser.add_argument('--json', help='write the summary to this JSON file')
    add_cfg_options(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mmengine.config import Config

    from gmpq_mm.apis import export_checkpoint
    from gmpq_mm.utils import check_paths
    from gmpq_mm.utils.cli import register_for_tool
    register_for_tool()

    for path, what in ((args.config, 'config'), (args.checkpoint,
                                                 'checkpoint')):
        if not osp.isfile(path):
            raise SystemExit(f'error: {what} file not found: {path}')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    # Export reads CHECKPOINT, never the config's training start point.
    cfg.load_from = None
    try:  # the policy file, if the model names one
        check_paths(cfg, phases=(), config_file=args.config)
    except FileNotFoundError as err:
        raise SystemExit(f'error: {err}')
    from gmpq_mm.quantization.targets import TargetError
    from gmpq_mm.utils.budget_checks import policy_target_warning
    try:  # names the layers the policy's target only emulates
        policy_target_warning(cfg)
    except TargetError as err:
        raise SystemExit(f'error: {err}')
    if is_onnx(args.out):
        return export_onnx(cfg, args)
    start = time.time()
    try:
        summary = export_checkpoint(
            cfg,
            args.checkpoint,
            args.out,
            verify=not args.no_verify,
            input_shape=args.input_shape)
    except RuntimeError as err:  # the rebuilt network disagrees
        raise SystemExit(f'error: {err}')
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
    write_json(args.json, summary)
    return summary


def write_json(path, summary) -> None:
    """``--json``: the summary as JSON, when a path was given."""
    if path:
        from gmpq_mm.quantization.atomic_file import write_text_atomic
        write_text_atomic(path, json.dumps(summary, indent=2))


def is_onnx(path) -> bool:
    """Whether ``--out`` asks for an ONNX model."""
    return str(path).lower().endswith('.onnx')


def export_onnx(cfg, args):
    """The ``.onnx`` branch: export, print the summary, ``--json`` it."""
    from gmpq_mm.apis import export_onnx_checkpoint

    start = time.time()
    try:
        summary = export_onnx_checkpoint(
            cfg,
            args.checkpoint,
            args.out,
            verify=not args.no_verify,
            input_shape=args.input_shape,
            mode=args.onnx_mode,
            calib_images=args.calib_images)
    except (ValueError, RuntimeError, ImportError) as err:
        raise SystemExit(f'error: {err}')
    summary['seconds'] = time.time() - start
    bits = sorted({(v['w_bits'], v['a_bits'])
                   for v in summary['layers'].values()})
    lines = [
        f'ONNX model ({summary["mode"]}) written to {summary["path"]}: '
        f'{summary["bytes"]} bytes ({summary["size_mb"]:.3f} MB), opset '
        f'{summary["opset"]}, input (N, '
        f'{", ".join(map(str, summary["input_shape"]))}) with a dynamic '
        f'batch', f'{summary["quantized_layers"]} quantized layers; (w, a) '
        f'bits used: {bits}'
    ]
    if summary['mode'] == 'integer':
        ort = summary['onnxruntime']
        lines.append(
            f'onnxruntime runs {ort["integer_convs"]} of '
            f'{len(summary["integer_layers"])} integer convs as QLinearConv'
            f' ({ort["ops"].get("QLinearAdd", 0)} QLinearAdd, '
            f'{ort["ops"].get("Conv", 0)} float Conv left: FP layers); '
            f'{summary.get("model_points", 0)} 8-bit points from the model '
            f'(requant_points); {len(summary["added_points"])} 8-bit points '
            'the PyTorch model does not have' +
            (f', ranges from {summary["calibration"]}'
             if summary['added_points'] else ''))
    else:
        lines.append(f'{summary["quantize_linear"]} QuantizeLinear, '
                     f'{summary["dequantize_linear"]} DequantizeLinear')
    if 'verify' in summary:
        v = summary['verify']
        tol = v['tolerances']
        lines.append(
            f'onnxruntime (CPU) on {v["batch_size"]} inputs: '
            f'relative L2 error of the logits {v["rel_l2"]:.3g} (max abs '
            f'diff {v["max_abs_diff"]:.3g}; {v["exact"]:.0%} of the samples '
            f'equal to float precision), top-1 agreement '
            f'{v["top1_agreement"]:.0%}; required: error <= '
            f'{tol["max_rel_l2"]:g}, agreement >= '
            f'{tol["min_top1_agreement"]:.0%}')
    lines.append(f'done in {summary["seconds"]:.2f} s')
    print('\n'.join(lines))
    write_json(args.json, summary)
    return summary


if __name__ == '__main__':
    main()
