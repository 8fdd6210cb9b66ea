"""Cost of one GMPQ search iteration against one FP training iteration.

CIFAR ResNet-18 (CIFAR stem), CPU. Three steps, each including the optimizer
update, built from the real registered classes:

* ``fp``: an mmpretrain ``ImageClassifier`` training step (SGD);
* ``single``: :func:`gmpq_mm.engine.single_level_step` of the search model
  (supernet w2346a2346 + frozen teacher + CE / attribution / complexity
  losses, both optimizers stepping);
* ``bilevel``: :func:`gmpq_mm.engine.bilevel_step` (an alpha step on one
  batch, then a weight step on another: two batches).

Time: one process runs the three in interleaved rounds (order rotated) so
machine load hits them alike; ratios are medians of per-round ratios.
Memory: each step runs in its own subprocess; peak RSS minus the RSS after
building the models and one warm-up step on a 2-image batch.

Example::

    python tools/analysis/benchmark_search.py --batch-size 64 --iters 5
"""
import argparse
import json
import os.path as osp
import resource
import statistics
import subprocess
import sys
import tempfile
import time

STEPS = ('fp', 'single', 'bilevel')
TARGETS = dict(single=dict(time=1.6, mem=2.0), bilevel=dict(time=3.2, mem=2.0))
BACKBONE = dict(
    type='ResNet_CIFAR',
    depth=18,
    num_stages=4,
    out_indices=(3, ),
    style='pytorch')


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument(
        '--worker', choices=STEPS + ('time', ), help=argparse.SUPPRESS)
    return parser.parse_args()


def build(batch_size):
    """Models, optimizers and step callables for every variant."""
    import torch
    from mmengine.optim import OptimWrapper
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    from mmpretrain.structures import DataSample

    from gmpq_mm.utils import register_all_modules
    register_all_modules()

    from gmpq_mm.engine import (SearchOptimWrapperConstructor, bilevel_step,
                                single_level_step)
    init_default_scope('mmpretrain')
    torch.manual_seed(0)
    head = dict(
        type='LinearClsHead',
        num_classes=10,
        in_channels=512,
        loss=dict(type='CrossEntropyLoss'))
    preprocessor = dict(
        type='ClsDataPreprocessor',
        num_classes=10,
        mean=[125.3, 123.0, 113.9],
        std=[63.0, 62.1, 66.7])
    fp_cfg = dict(
        type='ImageClassifier',
        backbone=BACKBONE,
        neck=dict(type='GlobalAveragePooling'),
        head=head)
    fp = MODELS.build(dict(fp_cfg, data_preprocessor=preprocessor))
    fp_optim = OptimWrapper(
        torch.optim.SGD(
            fp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4))
    ckpt = osp.join(tempfile.mkdtemp(), 'teacher.pth')
    torch.save({'state_dict': fp.state_dict()}, ckpt)
    search = MODELS.build(
        dict(
            type='GMPQSearchClassifier',
            backbone=dict(
                type='MixedPrecisionBackbone',
                backbone=BACKBONE,
                w_bits=[2, 3, 4, 6],
                a_bits=[2, 3, 4, 6]),
            neck=dict(type='GlobalAveragePooling'),
            head=head,
            teacher=fp_cfg,
            teacher_checkpoint=ckpt,
            attribution_loss=dict(type='AttributionRankLoss', loss_weight=40.),
            complexity_loss=dict(type='ComplexityLoss', loss_weight=3e-4),
            data_preprocessor=preprocessor))
    sgd = dict(type='SGD', momentum=0.9, weight_decay=1e-4)
    search_optim = SearchOptimWrapperConstructor(
        dict(
            weights=dict(optimizer=dict(sgd, lr=0.1)),
            arch=dict(optimizer=dict(sgd, lr=0.01))))(
                search)
    fp.train()
    search.train()

    def batch(n=batch_size):
        g = torch.Generator().manual_seed(n)
        return dict(
            inputs=[
                torch.randint(
                    0, 256, (3, 32, 32), generator=g, dtype=torch.uint8)
                for _ in range(n)
            ],
            data_samples=[DataSample().set_gt_label(i % 10) for i in range(n)])

    return dict(
        fp=lambda b: fp.train_step(b, optim_wrapper=fp_optim),
        single=lambda b: single_level_step(search, search_optim, b),
        bilevel=lambda b: bilevel_step(search, search_optim, b, b),
    ), batch


def maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_worker(step_name, args):
    import torch
    torch.set_num_threads(args.threads)
    steps, batch = build(args.batch_size)
    steps[step_name](batch(2))
    base = maxrss_mib()
    steps[step_name](batch())
    print(json.dumps(dict(step=step_name, peak_mib=maxrss_mib() - base)))


def time_worker(args):
    import torch
    torch.set_num_threads(args.threads)
    steps, batch = build(args.batch_size)
    data = batch()
    for name in STEPS:  # warm-up
        steps[name](data)
    rounds = []
    for i in range(args.iters):
        order = STEPS[i % 3:] + STEPS[:i % 3]
        seconds = {}
        for name in order:
            start = time.perf_counter()
            steps[name](data)
            seconds[name] = time.perf_counter() - start
        rounds.append(seconds)
    print(json.dumps(rounds))


def run_worker(kind, args):
    cmd = [
        sys.executable, __file__, '--worker', kind, '--batch-size',
        str(args.batch_size), '--iters',
        str(args.iters), '--threads',
        str(args.threads)
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    args = parse_args()
    if args.worker == 'time':
        return time_worker(args)
    if args.worker:
        return memory_worker(args.worker, args)
    print(f'CIFAR ResNet-18, batch {args.batch_size}, {args.threads} '
          f'threads, {args.iters} timed rounds')
    rounds = run_worker('time', args)
    mem = {name: run_worker(name, args)['peak_mib'] for name in STEPS}
    fp_time = statistics.median(r['fp'] for r in rounds)
    print(f'{"step":<8} {"median s":>9} {"x FP":>6} {"target":>7} '
          f'{"peak MiB":>9} {"x FP":>6} {"target":>7}')
    for name in STEPS:
        t = statistics.median(r[name] for r in rounds)
        ratio = statistics.median(r[name] / r['fp'] for r in rounds)
        target = TARGETS.get(name, {})
        print(f'{name:<8} {t:>9.3f} {ratio:>6.2f} '
              f'{target.get("time", "-")!s:>7} {mem[name]:>9.0f} '
              f'{mem[name] / mem["fp"]:>6.2f} {target.get("mem", "-")!s:>7}')
    print(f'(FP step {fp_time:.3f} s)')


if __name__ == '__main__':
    main()
