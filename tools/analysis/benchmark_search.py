"""Cost of one GMPQ search iteration against one FP training iteration.

CIFAR ResNet-18 (CIFAR stem), CPU. Steps, each including the optimizer
update, built from the real registered classes (the search steps once per
kernel backend of ``--backends``, as ``single:auto``, ...):

* ``fp``: an mmpretrain ``ImageClassifier`` training step (SGD);
* ``single``: :func:`gmpq_mm.engine.single_level_step` of the search model
  (supernet w2346a2346 + frozen teacher + CE / attribution / complexity
  losses, both optimizers stepping);
* ``bilevel``: :func:`gmpq_mm.engine.bilevel_step` (an alpha step on one
  batch, then a weight step on another: two batches).

Time: one process runs them all in interleaved rounds (order rotated) so
machine load hits them alike; ratios are medians of per-round ratios, of
wall time and of process CPU time (all threads; the steadier of the two on
a shared machine), each with its range over the rounds. A ratio whose
rounds disagree by more than ``--max-spread`` of the median, or that is
below 1.0 (a search step does more work than an FP step), is flagged
``NOISY`` with a warning saying why: it cannot be read. The load average
before and after the run is printed with the figures.
Kernels (``--backends``, default ``auto eager``): ``auto`` runs the
quantization kernels as a training run long enough to compile gets them by
default (compiled where ``torch.compile`` works, else eager); ``eager`` is
what every short process runs (and what every run ran before ``auto``).
The warm-up step of each, compile time included, is timed apart.
Memory: each step runs in its own subprocess; peak RSS minus the RSS after
building the models and one warm-up step on a 2-image batch.

Example::

    python tools/analysis/benchmark_search.py --batch-size 64 --iters 5
    # only the eager kernels, only time
    python tools/analysis/benchmark_search.py --backends eager --measure time
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from gmpq_mm.utils.timing import MAX_SPREAD, load_average, summarize_ratio

MODES = ('single', 'bilevel')
TARGETS = dict(single=dict(time=1.6, mem=2.0), bilevel=dict(time=3.2, mem=2.0))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument(
        '--backends',
        nargs='+',
        default=['auto', 'eager'],
        choices=['auto', 'eager', 'compile'],
        help='quantization kernels to time the search steps with, in the '
        'same rounds (auto: as a long training run gets them by default)')
    parser.add_argument(
        '--measure',
        nargs='+',
        default=['memory', 'time'],
        choices=['memory', 'time'],
        help='what to measure')
    parser.add_argument(
        '--max-spread',
        type=float,
        default=MAX_SPREAD,
        help='widest (max - min) / median of the per-round ratios that is '
        'still read as one ratio')
    parser.add_argument('--out', help='write the results as JSON here')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    parser.add_argument('--keys', nargs='*', help=argparse.SUPPRESS)
    return parser.parse_args()


def build(batch_size):
    """Models, optimizers and step callables for every variant."""
    import torch
    from mmengine.optim import OptimWrapper
    from mmpretrain.structures import DataSample

    from gmpq_mm.apis.benchmark_models import (build_classifier,
                                               build_search_model)
    from gmpq_mm.engine import (SearchOptimWrapperConstructor, bilevel_step,
                                single_level_step)
    from gmpq_mm.quantization.kernel_backend import (plan_run,
                                                     set_kernel_backend)
    plan_run(10**9)  # 'auto' as a long training run gets it
    torch.manual_seed(0)
    fp = build_classifier('fp', 'cifar', 10, preprocessor=True)
    fp_optim = OptimWrapper(
        torch.optim.SGD(
            fp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4))
    search = build_search_model('cifar', 10, teacher_state=fp.state_dict())
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

    def step(key):
        """``'fp'`` or ``'MODE:BACKEND'`` as a callable of a batch."""
        if key == 'fp':
            return lambda b: fp.train_step(b, optim_wrapper=fp_optim)
        mode, _, backend = key.partition(':')

        def run(b):
            set_kernel_backend(backend)
            if mode == 'single':
                return single_level_step(search, search_optim, b)
            return bilevel_step(search, search_optim, b, b)

        return run

    return step, batch


def maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_worker(key, args):
    import torch
    torch.set_num_threads(args.threads)
    step, batch = build(args.batch_size)
    run = step(key)
    run(batch(2))  # allocates gradients, compiles if the kernels compile
    base = maxrss_mib()
    run(batch())
    print(json.dumps(dict(step=key, peak_mib=maxrss_mib() - base)))


def time_worker(keys, args):
    """All steps interleaved in this process, order rotated every round."""
    import torch
    torch.set_num_threads(args.threads)
    step, batch = build(args.batch_size)
    from gmpq_mm.quantization.kernel_backend import get_kernel_backend
    steps = {key: step(key) for key in keys}
    data = batch()
    first, kernels = {}, {}
    for key in keys:  # warm-up (compiles, if the kernels compile)
        t0 = time.perf_counter()
        steps[key](data)
        first[key] = time.perf_counter() - t0
        kernels[key] = get_kernel_backend() if key != 'fp' else '-'
    wall = {key: [] for key in keys}
    cpu = {key: [] for key in keys}
    for i in range(args.iters):
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[key](data)
            wall[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
    print(
        json.dumps(
            dict(wall_s=wall, cpu_s=cpu, first_step_s=first, kernels=kernels)))


def run_worker(kind, args, keys):
    cmd = [
        sys.executable, __file__, '--worker', kind, '--batch-size',
        str(args.batch_size), '--iters',
        str(args.iters), '--threads',
        str(args.threads), '--keys'
    ] + list(keys)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f'worker {kind} failed (exit {out.returncode}):'
                           f'\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    args = parse_args()
    if args.worker == 'time':
        return time_worker(args.keys, args)
    if args.worker:
        return memory_worker(args.worker, args)
    keys = ['fp'] + [f'{m}:{b}' for b in args.backends for m in MODES]
    print(f'CIFAR ResNet-18, batch {args.batch_size}, {args.threads} '
          f'threads, {args.iters} timed rounds; load average before: '
          f'{load_average()}')
    timing = (
        run_worker('time', args, keys) if 'time' in args.measure else None)
    mem = {
        key: run_worker(key, args, [])['peak_mib']
        for key in keys
    } if 'memory' in args.measure else {}
    print(f'{"step":<15} {"median s":>9} {"wall x FP [range]":>22} '
          f'{"cpu x FP [range]":>22} {"target":>7} {"peak MiB":>9} '
          f'{"x FP":>6} {"target":>7}')
    results, warnings = {}, []
    for key in keys:
        target = TARGETS.get(key.partition(':')[0], {})
        row = {}
        texts = dict(wall='1', cpu='1', mem='1', median='-', mib='-')
        if timing:
            wall, cpu = timing['wall_s'], timing['cpu_s']
            row.update(
                wall_s=wall[key],
                cpu_s=cpu[key],
                first_step_s=timing['first_step_s'][key],
                kernels=timing['kernels'][key])
            texts['median'] = f'{statistics.median(wall[key]):.3f}'
        if mem:
            row['peak_mib'] = mem[key]
            texts['mib'] = f'{mem[key]:.0f}'
        if key != 'fp':
            for kind in ('wall', 'cpu') if timing else ():
                times = timing[f'{kind}_s']
                summary = summarize_ratio(
                    times[key],
                    times['fp'],
                    max_spread=args.max_spread,
                    what=f'{key} {kind} time')
                row[f'{kind}_ratio'] = summary._asdict()
                warnings += summary.warnings
                texts[kind] = summary.format()
            if mem:
                row['mem_ratio'] = mem[key] / max(mem['fp'], 1e-6)
                texts['mem'] = f'{row["mem_ratio"]:.2f}'
        results[key] = row
        print(f'{key:<15} {texts["median"]:>9} {texts["wall"]:>22} '
              f'{texts["cpu"]:>22} {target.get("time", "-")!s:>7} '
              f'{texts["mib"]:>9} {texts["mem"]:>6} '
              f'{target.get("mem", "-")!s:>7}')
    if timing:
        print('kernels: ' + ', '.join(f'{k} {v}'
                                      for k, v in timing['kernels'].items()))
        print('warm-up step, compile included: ' +
              ', '.join(f'{k} {v:.1f} s'
                        for k, v in timing['first_step_s'].items()))
    print(f'load average after: {load_average()}')
    for text in warnings:
        print(f'WARNING: {text}')
    if args.out:
        results['run'] = dict(
            batch_size=args.batch_size,
            threads=args.threads,
            iters=args.iters,
            load_average_after=load_average())
        with open(args.out, 'w') as f:
            json.dump(results, f, indent=2)


if __name__ == '__main__':
    main()
