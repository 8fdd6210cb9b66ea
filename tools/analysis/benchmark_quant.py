# Copyright (c) gmpq_mm contributors. All rights reserved.
"""Time and memory cost of the quantized layers on a CIFAR ResNet-18.

Compares one training step (forward + backward) of three networks built
from the same ResNet-18 (CIFAR stem):

* ``fp``: the full-precision network;
* ``supernet``: every conv except the stem replaced by a
  ``MixedPrecisionConv2d`` (weights and activations {2, 3, 4, 6} bits);
* ``w4a4``: every conv except the stem replaced by a ``QuantizedConv2d``
  with 4-bit weights and activations.

Each variant runs in its own subprocess, so its peak resident memory
(``ru_maxrss``) is its own; the script reports the peak minus the resident
size the same process had after building the model and the batch, i.e. the
memory of the training step itself. Times are the median over ``--iters``
steps after ``--warmup`` steps.

Example::

    python tools/analysis/benchmark_quant.py --batch-size 64 --iters 5
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
    parser.add_argument('--iters', type=int, default=5, help='timed steps')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps')
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
        default=['eager', 'compile'],
        choices=['eager', 'compile'],
        help='quantization kernel backends to run the quantized networks '
        'with (GMPQ_QUANT_BACKEND)')
    parser.add_argument(
        '--local-resnet',
        action='store_true',
        help='use the script\'s own ResNet-18 even if mmpretrain imports')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', help='write the results as JSON here')
    parser.add_argument('--worker', choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument('--backend', default='eager', help=argparse.SUPPRESS)
    return parser.parse_args()


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------
def build_local_resnet18(num_classes=10):
    """A ResNet-18 with the CIFAR stem and mmpretrain's module names."""
    import torch.nn as nn

    class BasicBlock(nn.Module):

        def __init__(self, in_channels, out_channels, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(
                in_channels, out_channels, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(out_channels)
            self.conv2 = nn.Conv2d(
                out_channels, out_channels, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(out_channels)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or in_channels != out_channels:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride,
                              bias=False), nn.BatchNorm2d(out_channels))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class ResNet18CIFAR(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            in_ch = 64
            for i, (ch, stride) in enumerate([(64, 1), (128, 2), (256, 2),
                                              (512, 2)]):
                blocks = [BasicBlock(in_ch, ch, stride), BasicBlock(ch, ch, 1)]
                self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
                in_ch = ch

        def forward(self, x):
            x = self.relu(self.bn1(self.conv1(x)))
            for i in range(4):
                x = getattr(self, f'layer{i + 1}')(x)
            return x

    return build_classifier(ResNet18CIFAR(), 512, num_classes), 'local'


def build_classifier(backbone, channels, num_classes):
    """Backbone + global average pool + linear head (the head stays FP)."""
    import torch.nn as nn

    class _Net(nn.Module):

        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(channels, num_classes)

        def forward(self, x):
            feat = self.backbone(x)
            if isinstance(feat, (tuple, list)):
                feat = feat[-1]
            return self.fc(self.pool(feat).flatten(1))

    return _Net()


def build_resnet18(prefer_mmpretrain=True):
    """ResNet-18 CIFAR from mmpretrain when it imports, else the local one.

    Returns:
        tuple: The classifier (backbone + pool + fc) and where it came from.
    """
    if prefer_mmpretrain:
        try:
            from mmpretrain.models import ResNet_CIFAR
        except Exception:  # noqa: BLE001 - any import failure -> fallback
            pass
        else:
            backbone = ResNet_CIFAR(depth=18)
            return build_classifier(backbone, 512, 10), 'mmpretrain.ResNet_CIFAR'
    return build_local_resnet18()


def swap_convs(net, variant):
    """Replace every conv of the backbone except the stem ``conv1``."""
    import torch.nn as nn

    from gmpq_mm.quantization.layers import (MixedPrecisionConv2d,
                                             QuantizedConv2d)
    backbone = net.backbone
    names = [
        name for name, m in backbone.named_modules()
        if isinstance(m, nn.Conv2d) and name != 'conv1'
    ]
    for name in names:
        parent_name, _, child = name.rpartition('.')
        parent = backbone.get_submodule(parent_name) if parent_name \
            else backbone
        conv = getattr(parent, child)
        if variant == 'supernet':
            new = MixedPrecisionConv2d.from_float(
                conv,
                w_candidates=(2, 3, 4, 6),
                a_candidates=(2, 3, 4, 6),
                layer_name=name)
        else:
            new = QuantizedConv2d.from_float(
                conv, w_bits=4, a_bits=4, layer_name=name)
        setattr(parent, child, new)
    return len(names)


# ---------------------------------------------------------------------------
# Worker: one variant in this process
# ---------------------------------------------------------------------------
def _maxrss_mib():
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(args):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    net, source = build_resnet18(not args.local_resnet)
    num_swapped = 0
    if args.worker != 'fp':
        num_swapped = swap_convs(net, args.worker)
    if args.worker != 'fp':
        from gmpq_mm.quantization.quantizers import set_kernel_backend
        set_kernel_backend(args.backend)
    net.train()

    def step(images, labels):
        loss = F.cross_entropy(net(images), labels)
        loss.backward()
        net.zero_grad(set_to_none=False)

    # One step on a tiny batch first: it allocates the gradients and, for
    # the compile backend, compiles the kernels (and imports the compiler),
    # so that none of this counts as memory of the measured steps.
    start = time.perf_counter()
    step(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2, )))
    prewarm_s = time.perf_counter() - start
    images = torch.randn(args.batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch_size, ))
    base_rss = _maxrss_mib()

    for _ in range(args.warmup):
        step(images, labels)
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step(images, labels)
        times.append(time.perf_counter() - start)
    result = dict(
        variant=args.worker,
        backend=args.backend if args.worker != 'fp' else None,
        prewarm_s=prewarm_s,
        model=source,
        swapped_convs=num_swapped,
        median_s=statistics.median(times),
        times_s=times,
        base_rss_mib=base_rss,
        peak_rss_mib=_maxrss_mib(),
        step_mem_mib=_maxrss_mib() - base_rss,
        torch=torch.__version__,
        threads=torch.get_num_threads())
    print('RESULT ' + json.dumps(result))


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------
def run_variant(variant, backend, args):
    cmd = [
        sys.executable,
        osp.abspath(__file__), '--worker', variant, '--backend', backend,
        '--batch-size',
        str(args.batch_size), '--iters',
        str(args.iters), '--warmup',
        str(args.warmup), '--threads',
        str(args.threads), '--seed',
        str(args.seed)
    ]
    if args.local_resnet:
        cmd.append('--local-resnet')
    env = dict(os.environ)
    repo_root = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (repo_root, env.get('PYTHONPATH')) if p)
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith('RESULT '):
            return json.loads(line[len('RESULT '):])
    raise RuntimeError(f'worker {variant} failed (exit {proc.returncode}):\n'
                       f'{proc.stdout}\n{proc.stderr}')


def main():
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    print('command: ' + ' '.join([osp.relpath(sys.argv[0])] + sys.argv[1:]))
    runs = [(v, 'eager') for v in args.variants if v == 'fp']
    runs += [(v, b) for b in args.backends for v in args.variants
             if v != 'fp']
    results = {}
    for variant, backend in runs:
        key = variant if variant == 'fp' else f'{variant}[{backend}]'
        res = run_variant(variant, backend, args)
        results[key] = res
        print(f"{key:>17s}: model={res['model']} "
              f"swapped={res['swapped_convs']} "
              f"median step {res['median_s'] * 1000:8.1f} ms "
              f"(all: {', '.join(f'{t:.2f}' for t in res['times_s'])} s), "
              f"step memory {res['step_mem_mib']:7.1f} MiB "
              f"(peak rss {res['peak_rss_mib']:.1f} MiB)")
    if 'fp' in results:
        fp = results['fp']
        print(f'ratios vs fp (batch {args.batch_size}, {args.threads} '
              f'threads, median of {args.iters} steps):')
        for key, res in results.items():
            if key == 'fp':
                continue
            t_ratio = res['median_s'] / fp['median_s']
            m_ratio = res['step_mem_mib'] / max(fp['step_mem_mib'], 1e-6)
            res['time_ratio'], res['mem_ratio'] = t_ratio, m_ratio
            target = TARGETS.get(res['variant'], {})
            t_note = (f" (target <= {target['time']})"
                      if target.get('time') else '')
            m_note = (f" (target <= {target['mem']})"
                      if target.get('mem') else '')
            print(f'{key:>17s}: time x{t_ratio:.2f}{t_note}, '
                  f'step memory x{m_ratio:.2f}{m_note}')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(results, f, indent=2)


if __name__ == '__main__':
    main()
