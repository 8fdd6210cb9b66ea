# Copyright (c) gmpq_mm contributors. All rights reserved.
"""onnxruntime (CPU) latency and file size: integer QDQ model against FP
and against uniform W8A8, in one run.

From one finetuned checkpoint, writes three ONNX files of the same network
through the export entry point (``gmpq_mm.apis.onnx_export``):

* ``int.onnx``: what ``tools/deploy/export.py --out x.onnx`` writes (the
  integer graph: QLinearConv for every quantized conv), checked;
* ``w8a8.onnx``: the same network with every quantized layer at 8 / 8 bits,
  exported the same way (the uniform int8 baseline);
* ``fp.onnx``: the network with every quantized layer put back to a float
  Conv / Linear holding the checkpoint's latent FP weights (no quantizer).

Then, for each thread count and batch size, times the three in
onnxruntime's CPU provider in interleaved rounds (the order rotates each
round, so the load of a shared machine hits all alike): each round runs
each model ``--iters`` times and keeps the median; each speed-up is the
median of the per-round ratios, with their range. A ratio whose rounds
spread by more than ``--noisy`` of its median is marked NOISY.

Example::

    python tools/analysis/benchmark_onnx.py configs/gmpq/finetune_r18_in1k.py \\
        r18_mixed.pth --work-dir work_dirs/onnx_bench \\
        --batch-sizes 1 8 --threads 1 2 --rounds 7
"""
import argparse
import json
import os
import os.path as osp
import statistics
import time

from gmpq_mm.utils.cli import add_cfg_options

MODELS = ('fp', 'w8a8', 'int')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='onnxruntime latency: integer QDQ vs FP vs W8A8')
    parser.add_argument('config', help='config file of the checkpoint')
    parser.add_argument('checkpoint', help='finetuned checkpoint')
    parser.add_argument(
        '--work-dir', required=True, help='where the .onnx files go')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8])
    parser.add_argument(
        '--threads',
        type=int,
        nargs='+',
        default=[1, 2],
        help='onnxruntime intra-op thread counts to time')
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument(
        '--noisy',
        type=float,
        default=0.2,
        help='mark a ratio NOISY when (max - min) / median of its rounds '
        'exceeds this')
    parser.add_argument(
        '--no-verify',
        action='store_true',
        help='skip the onnxruntime-vs-PyTorch check of the exports (for a '
        'network with random weights, whose low-bit layers amplify the '
        'integer graph\'s rounding: speed does not depend on the weights)')
    parser.add_argument(
        '--input-shape', type=int, nargs='+', help='C H W (or H W)')
    parser.add_argument('--json', help='write the results to this file')
    add_cfg_options(parser)
    return parser.parse_args(argv)


def float_copy(model):
    """``model`` with every quantized layer back to a float Conv / Linear
    holding its latent weights (the network without quantizers)."""
    from gmpq_mm.deploy.qdq_modules import float_module
    return float_module(model)


def _median_ms(sess, x, iters):
    name = sess.get_inputs()[0].name
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _ratio(num, den, noisy):
    ratios = [a / b for a, b in zip(num, den)]
    mid = statistics.median(ratios)
    spread = (max(ratios) - min(ratios)) / mid
    return dict(
        median=mid,
        min=min(ratios),
        max=max(ratios),
        noisy=spread > noisy,
        rounds=ratios)


def time_models(paths, batch_sizes, threads, rounds, iters, shape, noisy):
    """Interleaved timing of the ONNX files ``paths`` (name -> file)."""
    import numpy as np

    from gmpq_mm.deploy.ort_check import open_session
    rng = np.random.default_rng(0)
    table = {}
    for t in threads:
        sessions = {k: open_session(p, threads=t) for k, p in paths.items()}
        for bs in batch_sizes:
            x = rng.standard_normal((bs, ) + tuple(shape)).astype(np.float32)
            for sess in sessions.values():  # warm-up
                _median_ms(sess, x, 2)
            ms = {k: [] for k in sessions}
            keys = list(sessions)
            for r in range(rounds):
                order = keys[r % len(keys):] + keys[:r % len(keys)]
                for key in order:
                    ms[key].append(_median_ms(sessions[key], x, iters))
            row = {f'{k}_ms': statistics.median(v) for k, v in ms.items()}
            row['rounds_ms'] = ms
            row['int_vs_fp'] = _ratio(ms['fp'], ms['int'], noisy)
            row['int_vs_w8a8'] = _ratio(ms['w8a8'], ms['int'], noisy)
            table[f'threads={t},batch={bs}'] = dict(threads=t, batch=bs, **row)
    return table


def main(argv=None):
    args = parse_args(argv)
    import onnxruntime
    from mmengine.config import Config

    from gmpq_mm.apis import load_model
    from gmpq_mm.apis.onnx_export import (check_finetuned_checkpoint,
                                          export_onnx_model)
    from gmpq_mm.deploy.qdq_modules import uniform_bits_module
    from gmpq_mm.utils.cli import register_for_tool
    from gmpq_mm.utils.report import infer_input_shape
    register_for_tool()

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.load_from = None
    check_finetuned_checkpoint(args.checkpoint)
    model, cfg = load_model(cfg, args.checkpoint)
    shape = tuple(infer_input_shape(cfg, model, args.input_shape))
    os.makedirs(args.work_dir, exist_ok=True)
    paths = {k: osp.join(args.work_dir, f'{k}.onnx') for k in MODELS}
    exports = {}
    for key, net, mode in (('fp', model, 'fp'), ('int', model, 'integer'),
                           ('w8a8', uniform_bits_module(model), 'integer')):
        exports[key] = export_onnx_model(
            net,
            paths[key],
            shape,
            mode=mode,
            verify=not args.no_verify,
            source=args.checkpoint)
    table = time_models(paths, args.batch_sizes, args.threads, args.rounds,
                        args.iters, shape, args.noisy)
    results = dict(
        onnxruntime=onnxruntime.__version__,
        cpu_count=os.cpu_count(),
        load_average=list(os.getloadavg()),
        input_shape=list(shape),
        rounds=args.rounds,
        iters=args.iters,
        bytes={
            k: osp.getsize(p)
            for k, p in paths.items()
        },
        integer_convs={
            k: exports[k]['onnxruntime']['integer_convs']
            for k in ('int', 'w8a8')
        },
        verify={
            k: v.get('verify')
            for k, v in exports.items()
        },
        table=table)
    b = results['bytes']
    print(f'files: fp.onnx {b["fp"] / 1e6:.2f} MB, int.onnx '
          f'{b["int"] / 1e6:.2f} MB, w8a8.onnx {b["w8a8"] / 1e6:.2f} MB; '
          f'onnxruntime {results["onnxruntime"]}, input (N, '
          f'{", ".join(map(str, shape))}), QLinearConv: int '
          f'{results["integer_convs"]["int"]}, w8a8 '
          f'{results["integer_convs"]["w8a8"]}; load average '
          f'{results["load_average"][0]:.1f} on {results["cpu_count"]} CPUs')
    for row in table.values():
        fp, w8 = row['int_vs_fp'], row['int_vs_w8a8']
        print(f'threads {row["threads"]}, batch {row["batch"]}: fp '
              f'{row["fp_ms"]:.2f} ms, w8a8 {row["w8a8_ms"]:.2f} ms, int '
              f'{row["int_ms"]:.2f} ms; int vs fp {fp["median"]:.2f}x '
              f'({fp["min"]:.2f}..{fp["max"]:.2f})'
              f'{" NOISY" if fp["noisy"] else ""}, int vs w8a8 '
              f'{w8["median"]:.2f}x ({w8["min"]:.2f}..{w8["max"]:.2f})'
              f'{" NOISY" if w8["noisy"] else ""}')
    print(f'{args.rounds} interleaved rounds x {args.iters} runs each; '
          'a speed-up is the median of the per-round ratios (range)')
    if args.json:
        from gmpq_mm.quantization.atomic_file import write_text_atomic
        write_text_atomic(args.json, json.dumps(results, indent=2))
    return results


if __name__ == '__main__':
    main()
