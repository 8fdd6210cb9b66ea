# Copyright (c) gmpq_mm contributors. All rights reserved.
"""Cost of the finetune stage on the CPU: a training iteration of the
quantized ImageNet ResNet-18 against the FP one, and export + reload.

* **Iteration**: forward + backward + SGD step (momentum 0.9, wd 4e-5, as
  the finetune configs) of an ``ImageClassifier`` (ResNet-18, ImageNet stem,
  1000 classes) at ``--batch-size`` x ``--input-size`` px: the FP network
  and the same network with every conv of the residual stages a
  ``QuantizedConv2d`` (``--policy FILE``, default uniform W4A4). Both run in
  one process in interleaved rounds (order alternating) so a shared
  machine's load hits them alike; the ratio is the median of the per-round
  ratios. Target: <= 1.3x.
* **Export + reload**: write the packed artifact of the quantized
  ResNet-18 (:func:`gmpq_mm.quantization.export.save_artifact`) and rebuild
  the runnable network from it
  (:func:`gmpq_mm.apis.build_deployed_model`). Target: < 10 s.

224 px at batch 64 takes tens of seconds per iteration on a 2-core CPU;
``--input-size`` runs smaller images (the ratio is what matters; the
script prints what it ran). Example::

    python tools/analysis/benchmark_finetune.py --input-size 112 --iters 3
"""
import argparse
import copy
import json
import os
import os.path as osp
import statistics
import tempfile
import time

TARGET_RATIO = 1.3
TARGET_EXPORT_S = 10.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Benchmark a finetune iteration of the quantized '
        'ResNet-18 vs FP, and export + reload (CPU).')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--input-size', type=int, default=224)
    parser.add_argument(
        '--iters',
        type=int,
        default=3,
        help='timed rounds (one iteration of each network)')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument(
        '--threads',
        type=int,
        default=None,
        help='torch threads (default: torch\'s choice)')
    parser.add_argument('--policy', help='policy JSON (default: W4A4)')
    parser.add_argument('--json', help='write the numbers to this file')
    return parser.parse_args(argv)


def build(quantized, policy=None):
    """The ImageNet ResNet-18 (FP, or W4A4 / ``policy``) and its config."""
    from gmpq_mm.apis.benchmark_models import build_classifier, classifier_cfg
    kind, kwargs = 'fp', {}
    if quantized:
        kind, kwargs = 'w4a4', dict(signed=False)
        if policy:
            kwargs['policy'] = policy
    cfg = classifier_cfg(kind, 'imagenet', 1000, **kwargs)
    return build_classifier(kind, 'imagenet', 1000, **kwargs), cfg


def make_step(model, batch_size, size):
    import torch
    import torch.nn.functional as F
    opt = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, size, size, generator=gen)
    y = torch.randint(0, 1000, (batch_size, ), generator=gen)
    model.train()

    def step():
        start = time.perf_counter()
        loss = F.cross_entropy(model(x, mode='tensor'), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    return step


def main(argv=None):
    args = parse_args(argv)
    import torch

    from gmpq_mm.apis import build_deployed_model
    from gmpq_mm.quantization.calibration import calibrate_model
    from gmpq_mm.quantization.export import save_artifact
    from gmpq_mm.utils.cli import register_for_tool
    register_for_tool()
    if args.threads:
        torch.set_num_threads(args.threads)

    fp, _ = build(False)
    quant, quant_cfg = build(True, args.policy)
    # Calibrated ranges, as after the CalibrationHook (the cost of a step
    # does not depend on them, the export's thresholds do).
    calib = torch.randn(4, 3, args.input_size, args.input_size)
    calibrate_model(
        quant, [calib], forward=lambda m, b: m(b, mode='tensor'), bins=512)
    # Random weights at lr 0.01 may diverge within a few steps; export the
    # calibrated network as it was before them.
    snapshot = copy.deepcopy(quant.state_dict())
    steps = dict(
        fp=make_step(fp, args.batch_size, args.input_size),
        quant=make_step(quant, args.batch_size, args.input_size))
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times = dict(fp=[], quant=[])
    for i in range(args.iters):
        order = ('fp', 'quant') if i % 2 == 0 else ('quant', 'fp')
        for name in order:
            times[name].append(steps[name]())
    ratios = [q / f for q, f in zip(times['quant'], times['fp'])]
    ratio = statistics.median(ratios)

    quant.load_state_dict(snapshot)
    quant.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = osp.join(tmp, 'r18.safetensors')
        start = time.perf_counter()
        info = save_artifact(path, quant, config=quant_cfg)
        t_export = time.perf_counter() - start
        start = time.perf_counter()
        deployed, _ = build_deployed_model(path)
        t_reload = time.perf_counter() - start
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            diff = float((deployed(x, mode='tensor') -
                          quant(x, mode='tensor')).abs().max())
    result = dict(
        batch_size=args.batch_size,
        input_size=args.input_size,
        threads=torch.get_num_threads(),
        policy=args.policy or 'uniform W4A4',
        fp_step_s=statistics.median(times['fp']),
        quant_step_s=statistics.median(times['quant']),
        fp_steps_s=times['fp'],
        quant_steps_s=times['quant'],
        ratio=ratio,
        ratio_target=TARGET_RATIO,
        export_s=t_export,
        reload_s=t_reload,
        export_reload_s=t_export + t_reload,
        export_reload_target_s=TARGET_EXPORT_S,
        artifact_mb=info['bytes'] / 1e6,
        reload_max_abs_diff=diff)
    print(f'ResNet-18 finetune iteration (fwd + bwd + SGD), batch '
          f'{args.batch_size} at {args.input_size} px, '
          f'{result["threads"]} threads, {result["policy"]}:')
    print(f'  FP     {result["fp_step_s"]:.3f} s  (rounds: ' +
          ', '.join(f'{t:.3f}' for t in times['fp']) + ')')
    print(f'  quant  {result["quant_step_s"]:.3f} s  (rounds: ' +
          ', '.join(f'{t:.3f}' for t in times['quant']) + ')')
    print(f'  ratio quant / FP (median of rounds) {ratio:.3f}x '
          f'(target <= {TARGET_RATIO}x: '
          f'{"met" if ratio <= TARGET_RATIO else "NOT met"})')
    print(f'export {t_export:.2f} s + reload {t_reload:.2f} s = '
          f'{t_export + t_reload:.2f} s (target < {TARGET_EXPORT_S} s: '
          f'{"met" if t_export + t_reload < TARGET_EXPORT_S else "NOT met"})'
          f'; artifact {result["artifact_mb"]:.2f} MB; reloaded logits max '
          f'abs diff {diff:.3g}')
    if args.json:
        os.makedirs(osp.dirname(osp.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == '__main__':
    main()
