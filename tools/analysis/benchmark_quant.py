# Copyright (c) gmpq_mm contributors. All rights reserved.
"""Time and memory cost of the quantized layers on a CIFAR ResNet-18.

Compares one training step (forward + backward) of three networks built
from the configs' ResNet-18 (CIFAR stem) through the registered backbones
(:mod:`gmpq_mm.apis.benchmark_models`):

* ``fp``: the full-precision network;
* ``supernet``: ``MixedPrecisionBackbone``, every conv except the stem a
  ``MixedPrecisionConv2d`` (weights and activations {2, 3, 4, 6} bits);
* ``w4a4``: ``QuantizedBackbone``, every conv except the stem a
  ``QuantizedConv2d`` with 4-bit weights and activations.

Memory: each variant runs in its own subprocess, so its peak resident
memory (``ru_maxrss``) is its own; the script reports the peak minus the
resident size the same process had after building the model (and one step
on a tiny batch), i.e. the memory of the training step itself. The
subprocess runs with ``MALLOC_MMAP_THRESHOLD_=131072`` so that glibc maps
and unmaps every large block: the resident size then follows the live
tensors instead of whatever the heap kept from earlier steps.

Time: one subprocess builds every variant and runs them in interleaved
rounds (one step each, order rotated), so that a shared machine's load hits
them alike; the ratio to ``fp`` is the median of the per-round ratios, of
wall time and of process CPU time (all threads; the steadier of the two on
a shared machine), each with its range over the rounds. A ratio whose
rounds disagree by more than ``--max-spread`` of the median, or that is
below 1.0 (a quantized step does more work than an FP one), is flagged
``NOISY`` with a warning saying why: it cannot be read. The load average
before and after is printed with the figures. The quantized networks run with
each kernel backend asked for (``--backends``): ``auto`` (the default
setting, as a training run long enough to compile gets it: compiled
kernels where ``torch.compile`` works, else eager), ``eager`` (the kernels
every short process runs) or ``compile``. The first step of each network,
compile time included, is timed apart and reported.

Example::

    python tools/analysis/benchmark_quant.py --batch-size 64 --iters 5
    # only the eager kernels, only time
    python tools/analysis/benchmark_quant.py --backends eager --measure time
"""
import argparse
import json
import os
import os.path as osp
import resource
import statistics
import subprocess
import sys
import time

from gmpq_mm.utils.timing import MAX_SPREAD, load_average, summarize_ratio

VARIANTS = ('fp', 'supernet', 'w4a4')
# Targets from the quantization issue: ratio to the FP network.
TARGETS = {
    'supernet': dict(time=1.5, mem=1.6),
    'w4a4': dict(time=1.3, mem=None),
}


def parse_args():
    parser = argparse.ArgumentParser(
        description='Benchmark the GMPQ quantized layers (CPU, one step = '
        'forward + backward of a CIFAR ResNet-18).')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument(
        '--iters', type=int, default=5, help='timed rounds (one step each)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed rounds')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument(
        '--variants',
        nargs='+',
        default=list(VARIANTS),
        choices=VARIANTS,
        help='networks to compare (the ratios need fp)')
    parser.add_argument(
        '--backends',
        nargs='+',
        default=['auto', 'eager'],
        choices=['auto', 'eager', 'compile'],
        help='quantization kernel backends to run the quantized networks '
        'with (auto: as a long training run gets it by default)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--max-spread',
        type=float,
        default=MAX_SPREAD,
        help='widest (max - min) / median of the per-round ratios that is '
        'still read as one ratio')
    parser.add_argument('--out', help='write the results as JSON here')
    parser.add_argument(
        '--measure',
        nargs='+',
        default=['memory', 'time'],
        choices=['memory', 'time'],
        help='what to measure')
    parser.add_argument(
        '--mem-steps',
        type=int,
        default=1,
        help='full-batch steps of each memory run')
    # Internal: what a worker subprocess does.
    parser.add_argument(
        '--worker', choices=['memory', 'time'], help=argparse.SUPPRESS)
    parser.add_argument('--variant', choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument('--backend', default='auto', help=argparse.SUPPRESS)
    parser.add_argument('--runs', nargs='+', help=argparse.SUPPRESS)
    return parser.parse_args()


# ---------------------------------------------------------------------------
# Workers (subprocesses)
# ---------------------------------------------------------------------------
def _maxrss_mib():
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build_variant(variant, args):
    """The classifier for ``variant`` and the number of quantized convs.

    The configs' ResNet-18 (CIFAR stem) through the registered backbones
    (:mod:`gmpq_mm.apis.benchmark_models`): its forward is backbone, global
    average pooling and the FP linear head.
    """
    import torch

    from gmpq_mm.apis.benchmark_models import build_classifier
    from gmpq_mm.quantization.layers import is_mixed_layer, is_quantized_layer
    torch.manual_seed(args.seed)
    net = build_classifier(variant, 'cifar', 10)
    num_swapped = sum(
        is_mixed_layer(m) or is_quantized_layer(m) for m in net.modules())
    return net.train(), 'mmpretrain.ResNet_CIFAR', num_swapped


def _make_step(net, backend):
    import torch.nn.functional as F

    from gmpq_mm.quantization.kernel_backend import (plan_run,
                                                     set_kernel_backend)

    def step(images, labels):
        set_kernel_backend(backend)
        if backend == 'auto':
            plan_run(10**9)  # what a long training run gets
        loss = F.cross_entropy(net(images, mode='tensor'), labels)
        loss.backward()
        net.zero_grad(set_to_none=False)

    return step


def _batch(batch_size):
    import torch
    return (torch.randn(batch_size, 3, 32,
                        32), torch.randint(0, 10, (batch_size, )))


def memory_worker(args):
    """Peak memory of one variant's training step, in this process."""
    import torch
    torch.set_num_threads(args.threads)
    net, source, num_swapped = _build_variant(args.variant, args)
    step = _make_step(net, args.backend)
    # A step on a tiny batch first: it allocates the gradients and, for the
    # compile backend, compiles the kernels (and imports the compiler), so
    # that none of this counts as memory of the measured steps.
    step(*_batch(2))
    images, labels = _batch(args.batch_size)
    base_rss = _maxrss_mib()
    for _ in range(args.mem_steps):
        step(images, labels)
    peak_rss = _maxrss_mib()
    return dict(
        model=source,
        swapped_convs=num_swapped,
        base_rss_mib=base_rss,
        peak_rss_mib=peak_rss,
        step_mem_mib=peak_rss - base_rss)


def time_worker(args):
    """Step times of all variants, interleaved in this one process.

    The machine may be shared: interleaving the variants round by round
    exposes them to the same load, and the per-round ratios to ``fp``
    cancel most of its drift.
    """
    import torch
    torch.set_num_threads(args.threads)
    from gmpq_mm.quantization.kernel_backend import get_kernel_backend
    steps, first, kernels = {}, {}, {}
    for key in args.runs:
        variant, _, backend = key.partition(':')
        net = _build_variant(variant, args)[0]
        steps[key] = _make_step(net, backend or 'eager')
        t0 = time.perf_counter()
        steps[key](*_batch(2))  # compiles, if that backend compiles
        first[key] = time.perf_counter() - t0
        kernels[key] = get_kernel_backend()
    images, labels = _batch(args.batch_size)
    for _ in range(args.warmup):
        for step in steps.values():
            step(images, labels)
    wall = {key: [] for key in steps}
    cpu = {key: [] for key in steps}
    keys = list(steps)
    for i in range(args.iters):
        # Rotate the order so no variant always runs right after another.
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[key](images, labels)
            wall[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
    return dict(
        wall_s=wall,
        cpu_s=cpu,
        first_step_s=first,
        kernels=kernels,
        threads=torch.get_num_threads())


def run_worker(args):
    result = (
        memory_worker(args) if args.worker == 'memory' else time_worker(args))
    print('RESULT ' + json.dumps(result))


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------
def _run_subprocess(extra_args, args, env_extra=None):
    cmd = [
        sys.executable,
        osp.abspath(__file__), '--batch-size',
        str(args.batch_size), '--iters',
        str(args.iters), '--warmup',
        str(args.warmup), '--mem-steps',
        str(args.mem_steps), '--threads',
        str(args.threads), '--seed',
        str(args.seed)
    ] + extra_args
    env = dict(os.environ)
    repo_root = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (repo_root, env.get('PYTHONPATH')) if p)
    env.update(env_extra or {})
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith('RESULT '):
            return json.loads(line[len('RESULT '):])
    raise RuntimeError(f'worker {extra_args} failed (exit {proc.returncode})'
                       f':\n{proc.stdout}\n{proc.stderr}')


def main():
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    print('command: ' +
          ' '.join(['python', osp.relpath(sys.argv[0])] + sys.argv[1:]))
    print(f'load average before: {load_average()}')
    runs = ['fp'] if 'fp' in args.variants else []
    runs += [
        f'{v}:{b}' for b in args.backends for v in args.variants if v != 'fp'
    ]
    results = {key: dict(variant=key.partition(':')[0]) for key in runs}

    # Memory: one process per variant. Large blocks are mmap-ed and given
    # back on free (glibc), so the resident peak follows the live tensors
    # instead of what the heap happened to keep.
    for key in runs if 'memory' in args.measure else []:
        variant, _, backend = key.partition(':')
        worker_args = ['--worker', 'memory', '--variant', variant]
        worker_args += ['--backend', backend or 'eager']
        res = _run_subprocess(
            worker_args, args, env_extra=dict(MALLOC_MMAP_THRESHOLD_='131072'))
        results[key].update(res)
        print(f"memory {key:>17s}: model={res['model']} "
              f"swapped={res['swapped_convs']} step memory "
              f"{res['step_mem_mib']:7.1f} MiB (peak rss "
              f"{res['peak_rss_mib']:.1f} MiB)")

    # Time: all variants interleaved in one process.
    timing = (
        _run_subprocess(['--worker', 'time', '--runs'] + runs, args)
        if 'time' in args.measure else dict(wall_s={}, cpu_s={}))
    for key in timing['wall_s']:
        wall, cpu = timing['wall_s'][key], timing['cpu_s'][key]
        results[key].update(
            wall_s=wall,
            cpu_s=cpu,
            median_s=statistics.median(wall),
            median_cpu_s=statistics.median(cpu),
            first_step_s=timing['first_step_s'][key],
            kernels=timing['kernels'][key])
        print(f"time   {key:>17s}: median step {statistics.median(wall):6.2f}"
              f" s wall, {statistics.median(cpu):6.2f} s cpu (wall: "
              f"{', '.join(f'{t:.2f}' for t in wall)}); kernels "
              f"{timing['kernels'][key]}, first step (2 images, compile "
              f"included) {timing['first_step_s'][key]:.1f} s")

    if 'fp' in results:
        _print_ratios(results, args)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(results, f, indent=2)


def _print_ratios(results, args):
    """Print (and store in ``results``) each variant's ratios to ``fp``."""
    fp = results['fp']
    print(f'ratios vs fp (batch {args.batch_size}, {args.threads} threads; '
          f'time = median [min-max] of the per-round ratios over '
          f'{args.iters} interleaved rounds; load average now: '
          f'{load_average()}):')
    warnings = []
    for key, res in results.items():
        if key == 'fp':
            continue
        target = TARGETS.get(res['variant'], {})
        parts = []
        if 'wall_s' in res:
            note = (f" (target <= {target['time']})"
                    if target.get('time') else '')
            texts = []
            for kind in ('wall', 'cpu'):
                summary = summarize_ratio(
                    res[f'{kind}_s'],
                    fp[f'{kind}_s'],
                    max_spread=args.max_spread,
                    what=f'{key} {kind} time')
                res[f'{kind}_ratio'] = summary._asdict()
                warnings += summary.warnings
                texts.append(f'{kind} {summary.format()}')
            parts.append(f"time {', '.join(texts)}{note}")
        if 'step_mem_mib' in res:
            res['mem_ratio'] = res['step_mem_mib'] / max(
                fp['step_mem_mib'], 1e-6)
            note = (f" (target <= {target['mem']})"
                    if target.get('mem') else '')
            parts.append(f"step memory x{res['mem_ratio']:.2f}{note}")
        print(f"{key:>17s}: {'; '.join(parts)}")
    for text in warnings:
        print(f'WARNING: {text}')


if __name__ == '__main__':
    main()
