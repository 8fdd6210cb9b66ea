# Copyright (c) gmpq_mm contributors. All rights reserved.
"""onnxruntime (CPU) latency and file size: QDQ model against FP model.

From one finetuned checkpoint, writes two ONNX files of the same network:

* ``qdq.onnx``: what ``tools/deploy/export.py --out x.onnx`` writes (int8
  weight codes + DequantizeLinear, Clip / QuantizeLinear / DequantizeLinear
  on the quantized inputs), checked by onnxruntime;
* ``fp.onnx``: the network with every quantized layer put back to a float
  Conv / Linear holding the checkpoint's latent FP weights (no quantizer).

Then times both in onnxruntime's CPU provider in interleaved rounds (the
order alternates each round, so the load of a shared machine hits both
alike): each round runs each model ``--iters`` times and keeps the median;
the QDQ / FP ratio is the median of the per-round ratios.

Example::

    python tools/analysis/benchmark_onnx.py \\
        configs/gmpq/demo/finetune_r18_fashion_mnist.py epoch_2.pth \\
        --work-dir work_dirs/onnx_bench --batch-sizes 1 32 --rounds 7
"""
import argparse
import copy
import json
import os
import os.path as osp
import statistics
import time

from gmpq_mm.utils.cli import DictAction


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='onnxruntime latency of the QDQ model against FP')
    parser.add_argument('config', help='config file of the checkpoint')
    parser.add_argument('checkpoint', help='finetuned checkpoint')
    parser.add_argument(
        '--work-dir', required=True, help='where the two .onnx files go')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 32])
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument(
        '--threads',
        type=int,
        default=0,
        help='onnxruntime intra-op threads (0: its default)')
    parser.add_argument(
        '--input-shape', type=int, nargs='+', help='C H W (or H W)')
    parser.add_argument('--json', help='write the results to this file')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value (xxx=yyy format)')
    return parser.parse_args(argv)


def float_copy(model):
    """``model`` with every quantized layer back to a float Conv / Linear
    holding its latent weights (the network without quantizers)."""
    import torch.nn as nn

    from gmpq_mm.quantization.layers import is_quantized_layer
    fp = copy.deepcopy(model).eval()
    names = [n for n, m in fp.named_modules() if is_quantized_layer(m)]
    for name in names:
        parent_name, _, attr = name.rpartition('.')
        parent = fp.get_submodule(parent_name) if parent_name else fp
        q = getattr(parent, attr)
        if isinstance(q, nn.Conv2d):
            new = nn.Conv2d(q.in_channels, q.out_channels, q.kernel_size,
                            q.stride, q.padding, q.dilation, q.groups, q.bias
                            is not None)
        else:
            new = nn.Linear(q.in_features, q.out_features, q.bias is not None)
        new.load_state_dict({
            k: v
            for k, v in q.state_dict().items() if k in ('weight', 'bias')
        })
        setattr(parent, attr, new)
    return fp


def _session(path, threads):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])


def _median_ms(sess, x, iters):
    name = sess.get_inputs()[0].name
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import onnxruntime
    import torch
    from mmengine.config import Config

    from gmpq_mm.apis import export_onnx_checkpoint, load_model
    from gmpq_mm.apis.onnx_export import LogitsOnly
    from gmpq_mm.compat import export_onnx
    from gmpq_mm.quantization.onnx_qdq import ONNX_OPSET
    from gmpq_mm.utils import register_all_modules
    register_all_modules()

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    os.makedirs(args.work_dir, exist_ok=True)
    qdq_path = osp.join(args.work_dir, 'qdq.onnx')
    fp_path = osp.join(args.work_dir, 'fp.onnx')
    summary = export_onnx_checkpoint(
        cfg, args.checkpoint, qdq_path, input_shape=args.input_shape)
    shape = tuple(summary['input_shape'])
    model, _ = load_model(cfg, args.checkpoint)
    with torch.no_grad():
        export_onnx(
            LogitsOnly(float_copy(model)).eval(),
            (torch.zeros((2, ) + shape), ),
            fp_path,
            opset_version=ONNX_OPSET,
            input_names=['input'],
            output_names=['logits'],
            dynamic_axes={
                'input': {
                    0: 'batch'
                },
                'logits': {
                    0: 'batch'
                }
            })
    results = dict(
        onnxruntime=onnxruntime.__version__,
        threads=args.threads or 'default',
        cpu_count=os.cpu_count(),
        input_shape=list(shape),
        verify=summary['verify'],
        bytes=dict(fp=osp.getsize(fp_path), qdq=osp.getsize(qdq_path)),
        batches={})
    sessions = dict(
        fp=_session(fp_path, args.threads),
        qdq=_session(qdq_path, args.threads))
    rng = np.random.default_rng(0)
    for bs in args.batch_sizes:
        x = rng.standard_normal((bs, ) + shape).astype(np.float32)
        for sess in sessions.values():  # warm-up
            _median_ms(sess, x, 3)
        rounds = {'fp': [], 'qdq': []}
        for r in range(args.rounds):
            order = ('fp', 'qdq') if r % 2 == 0 else ('qdq', 'fp')
            for key in order:
                rounds[key].append(_median_ms(sessions[key], x, args.iters))
        ratios = [q / f for q, f in zip(rounds['qdq'], rounds['fp'])]
        results['batches'][bs] = dict(
            fp_ms=statistics.median(rounds['fp']),
            qdq_ms=statistics.median(rounds['qdq']),
            ratio=statistics.median(ratios),
            ratio_min=min(ratios),
            ratio_max=max(ratios),
            rounds=rounds)
    b = results['bytes']
    print(f'files: fp.onnx {b["fp"] / 1e6:.3f} MB, qdq.onnx '
          f'{b["qdq"] / 1e6:.3f} MB (x{b["qdq"] / b["fp"]:.3f}); '
          f'onnxruntime {results["onnxruntime"]}, threads '
          f'{results["threads"]}, input (N, {", ".join(map(str, shape))})')
    v = summary['verify']
    print(f'qdq.onnx checked: logits relative L2 error {v["rel_l2"]:.3g}, '
          f'max abs diff {v["max_abs_diff"]:.3g}, top-1 agreement '
          f'{v["top1_agreement"]:.0%} on {v["batch_size"]} random inputs')
    for bs, row in results['batches'].items():
        print(f'batch {bs}: fp {row["fp_ms"]:.2f} ms, qdq '
              f'{row["qdq_ms"]:.2f} ms, qdq / fp {row["ratio"]:.2f} '
              f'(rounds {row["ratio_min"]:.2f}..{row["ratio_max"]:.2f}, '
              f'{args.rounds} rounds x {args.iters} runs)')
    if args.json:
        from gmpq_mm.quantization.atomic_file import write_text_atomic
        write_text_atomic(args.json, json.dumps(results, indent=2))
    return results


if __name__ == '__main__':
    main()
