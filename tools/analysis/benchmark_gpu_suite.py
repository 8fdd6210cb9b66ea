"""Run the GPU benchmark grid, one process per stage, and write the table.

Stages (each a ``benchmark_cuda.py`` process with its own timeout):

* ResNet-18, CIFAR stem, 32 px, batch 256 and ImageNet stem, 224 px,
  batch 64;
* fp32 and AMP (fp16 autocast);
* quantization kernels ``eager`` and ``compile``;

each timing FP, W4A4, the supernet alone and the single-level and bilevel
search steps (images/s, ratio to FP, peak memory, warm-up with compile).
Every stage writes ``OUT/<stage>.json`` and its log as soon as it ends, and
``OUT/summary.md`` is rewritten after every stage, so a run cut short by its
device budget keeps what it measured. A stage that times out or fails is
recorded as such and the next one starts.

From the bilevel step at 32 px / batch 256, the summary estimates the wall
time of ``configs/gmpq/search_r18_cifar10.py`` on one GPU: 25 epochs of
``ceil(25,000 / 256) = 98`` bilevel iterations (CIFAR-10's 50,000 training
images cut in half for the weights and the arch steps), plus the warm-up.
Data loading and validation are not in it: the estimate is of the model's
compute.

``--device cpu --smoke`` runs a tiny grid (batch 2, one iteration) on the
CPU to check the script on a machine without a GPU; its figures mean
nothing.

Example::

    python tools/analysis/benchmark_gpu_suite.py --out work_dirs/gpu_bench
    # about 10 minutes on one H200; less: --stage-timeout 90 --iters 5
"""
import argparse
import json
import math
import os
import os.path as osp
import subprocess
import sys
import time

SHAPES = {
    'cifar32': dict(input_size=32, batch_size=256, cifar=True),
    'in224': dict(input_size=224, batch_size=64, cifar=False),
}
PRECISIONS = ('fp32', 'amp')
BACKENDS = ('eager', 'compile')
# configs/gmpq/search_r18_cifar10.py: 25 epochs, batch 256, bilevel on a
# 50/50 split of CIFAR-10's 50,000 training images.
SEARCH_EPOCHS = 25
SEARCH_WEIGHT_IMAGES = 25000
SEARCH_BATCH = 256


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', required=True, help='output folder')
    parser.add_argument(
        '--shapes', nargs='+', default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument(
        '--precisions',
        nargs='+',
        default=list(PRECISIONS),
        choices=PRECISIONS)
    parser.add_argument(
        '--backends', nargs='+', default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument(
        '--stage-timeout',
        type=float,
        default=120,
        help='seconds one stage may run')
    parser.add_argument('--device', default='cuda')
    parser.add_argument(
        '--smoke',
        action='store_true',
        help='batch 2, one iteration: check the script')
    return parser.parse_args(argv)


def stages(args):
    for shape in args.shapes:
        for precision in args.precisions:
            for backend in args.backends:
                yield f'{shape}_{precision}_{backend}', shape, precision, \
                    backend


def stage_command(args, shape, precision, backend, json_path):
    spec = SHAPES[shape]
    script = osp.join(osp.dirname(osp.abspath(__file__)), 'benchmark_cuda.py')
    cmd = [
        sys.executable, script, '--input-size',
        str(spec['input_size']), '--batch-size',
        str(2 if args.smoke else spec['batch_size']), '--iters',
        str(1 if args.smoke else args.iters), '--warmup',
        str(1 if args.smoke else args.warmup), '--backend', backend,
        '--device', args.device, '--json', json_path
    ]
    if spec['cifar']:
        cmd.append('--cifar')
    if precision == 'amp':
        cmd.append('--amp')
    return cmd


def run_stage(cmd, log_path, timeout):
    """Run one stage; ``'ok'``, ``'timeout'`` or ``'failed (exit N)'``."""
    env = dict(os.environ)
    root = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (root, env.get('PYTHONPATH')) if p)
    with open(log_path, 'w') as log:
        log.write(' '.join(cmd) + '\n')
        log.flush()
        try:
            proc = subprocess.run(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=timeout)
        except subprocess.TimeoutExpired:
            return 'timeout'
    return 'ok' if proc.returncode == 0 else f'failed (exit {proc.returncode})'


def search_estimate(result):
    """Minutes of the 25-epoch CIFAR-10 search from one bilevel step at
    32 px, batch 256 (compile / warm-up time added once)."""
    bilevel = result['results'].get('bilevel')
    if not bilevel or result.get('batch_size') != SEARCH_BATCH:
        return None
    iters = math.ceil(SEARCH_WEIGHT_IMAGES / SEARCH_BATCH) * SEARCH_EPOCHS
    return (iters * bilevel['step_s'] + bilevel['warmup_s']) / 60


def summary(args, status, started):
    """The Markdown table of every stage so far."""
    lines = [
        '# GPU benchmark (tools/analysis/benchmark_gpu_suite.py)', '',
        f'command: `{" ".join(["python"] + sys.argv)}`', '',
        '| stage | step | img/s | x FP time | peak GiB | x FP mem | '
        'warm-up s | kernels |', '| --- | --- | --- | --- | --- | --- | '
        '--- | --- |'
    ]
    estimates = []
    device = None
    for name, state in status.items():
        path = osp.join(args.out, f'{name}.json')
        if state != 'ok' or not osp.exists(path):
            lines.append(f'| {name} | ({state}) | | | | | | |')
            continue
        with open(path) as f:
            result = json.load(f)
        device = result.get('device_name', device)
        for step, r in result['results'].items():
            lines.append(f'| {name} | {step} | {r["images_per_s"]:.0f} | '
                         f'{r["time_vs_fp"]:.2f} | {r["peak_gib"]:.2f} | '
                         f'{r["mem_vs_fp"]:.2f} | {r["warmup_s"]:.1f} | '
                         f'{r["kernels"]} |')
        minutes = search_estimate(result)
        if minutes is not None:
            estimates.append(f'- {name}: {minutes:.1f} min')
    lines += [
        '', f'device: {device}; {len(status)} stage(s), '
        f'{time.time() - started:.0f} s so far', ''
    ]
    if estimates:
        lines += [
            'Estimated wall time of configs/gmpq/search_r18_cifar10.py on '
            f'one GPU ({SEARCH_EPOCHS} epochs x '
            f'{math.ceil(SEARCH_WEIGHT_IMAGES / SEARCH_BATCH)} bilevel '
            'iterations at batch 256, compute only; goal <= 15 min):', ''
        ] + estimates + ['']
    if args.smoke:
        lines += ['SMOKE RUN (tiny batch): the figures mean nothing.', '']
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    # Compiled kernels are cached on disk: the later stages reuse them.
    os.environ.setdefault('TORCHINDUCTOR_CACHE_DIR',
                          osp.join(osp.abspath(args.out), 'inductor_cache'))
    status, started = {}, time.time()
    for name, shape, precision, backend in stages(args):
        json_path = osp.join(args.out, f'{name}.json')
        if osp.exists(json_path):
            os.remove(json_path)
        cmd = stage_command(args, shape, precision, backend, json_path)
        t0 = time.time()
        status[name] = run_stage(cmd, osp.join(args.out, f'{name}.log'),
                                 args.stage_timeout)
        print(f'{name}: {status[name]} ({time.time() - t0:.0f} s)', flush=True)
        text = summary(args, status, started)
        with open(osp.join(args.out, 'summary.md'), 'w') as f:
            f.write(text)
    print(text)


if __name__ == '__main__':
    main()
