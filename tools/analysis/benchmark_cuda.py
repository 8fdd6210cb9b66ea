"""Training throughput on a GPU: images/s of each GMPQ step beside FP.

ResNet-18 (ImageNet stem, 1000 classes; ``--cifar``: the CIFAR stem and 10
classes, as the CIFAR-10 search config) at ``--input-size``, built from the
registered classes, one optimizer update included in every step:

* ``fp``: mmpretrain ``ImageClassifier`` train step (what a finetune of the
  FP network costs);
* ``w4a4``: the same with ``QuantizedBackbone`` at W4A4 (the finetune);
* ``supernet``: the same with ``MixedPrecisionBackbone`` (w2346a2346), no
  teacher and no search losses: the cost of the mixed layers alone;
* ``single`` / ``bilevel``: a GMPQ search step (supernet w2346a2346, frozen
  FP teacher, CE + attribution + complexity losses); ``bilevel`` is an arch
  step plus a weight step, so it sees two batches.

``--amp`` runs every step under mmengine's ``AmpOptimWrapper`` (fp16
autocast, dynamic loss scale). ``--backend``: the quantization kernels
(``auto``, the default, as a long training run gets them: compiled where
``torch.compile`` works, else eager; or ``eager`` / ``compile``); the
kernels that actually ran are printed and stored. Batches stay on the GPU
(uint8, as a data loader delivers them), so the figures are of the model,
not of JPEG decoding. Ratios are against ``fp`` of the same run.

``--device cpu`` runs the same steps on the CPU: a smoke test of the
script on a machine without a GPU (tiny batch), not a benchmark.
``tools/analysis/benchmark_gpu_suite.py`` runs the whole grid of sizes,
precisions and backends, one process per stage, with timeouts.

Example::

    python tools/analysis/benchmark_cuda.py --batch-size 128 --amp
    python tools/analysis/benchmark_cuda.py --cifar --input-size 32 \
        --batch-size 256 --backend eager
"""
import argparse
import json
import statistics
import time

STEPS = ('fp', 'w4a4', 'supernet', 'single', 'bilevel')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--input-size', type=int, default=224)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument(
        '--amp',
        action='store_true',
        help='fp16 autocast with dynamic loss scaling')
    parser.add_argument(
        '--cifar',
        action='store_true',
        help='ResNet-18 with the CIFAR stem, 10 classes')
    parser.add_argument(
        '--backend',
        default='auto',
        choices=['auto', 'eager', 'compile'],
        help='quantization kernels (auto: as a long '
        'training run gets them)')
    parser.add_argument(
        '--device',
        default='cuda',
        help="'cuda' (a benchmark) or 'cpu' (a smoke test)")
    parser.add_argument('--steps', nargs='+', choices=STEPS, default=STEPS)
    parser.add_argument('--json', help='write the numbers to this file')
    return parser.parse_args(argv)


def build(args, device):
    """Step callables (one optimizer update each) and a GPU batch."""
    import torch
    from mmengine.optim import build_optim_wrapper
    from mmpretrain.structures import DataSample

    from gmpq_mm.apis.benchmark_models import (build_classifier,
                                               build_search_model)
    from gmpq_mm.engine import bilevel_step, single_level_step
    torch.manual_seed(0)
    num_classes = 10 if args.cifar else 1000
    stem = 'cifar' if args.cifar else 'imagenet'
    # ImageNet's mean and std for both stems (the throughput does not
    # depend on them).
    preprocessor = dict(
        type='ClsDataPreprocessor',
        num_classes=num_classes,
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        to_rgb=False)
    wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic') \
        if args.amp else dict(type='OptimWrapper')
    sgd = dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=1e-4)

    def classifier(kind):
        model = build_classifier(
            kind, stem, num_classes, preprocessor=preprocessor)
        model.to(device).train()
        optim = build_optim_wrapper(model, dict(wrapper, optimizer=sgd))
        return lambda b: model.train_step(b, optim_wrapper=optim)

    steps = {
        kind: classifier(kind)
        for kind in ('fp', 'w4a4', 'supernet') if kind in args.steps
    }
    if {'single', 'bilevel'} & set(args.steps):
        search = build_search_model(
            stem,
            num_classes,
            preprocessor=preprocessor,
            input_shape=(3, args.input_size, args.input_size)).to(device)
        search_optim = build_optim_wrapper(
            search,
            dict(
                constructor='SearchOptimWrapperConstructor',
                weights=dict(wrapper, optimizer=sgd),
                arch=dict(wrapper, optimizer=dict(sgd, lr=0.01))))
        steps['single'] = lambda b: single_level_step(search, search_optim, b)
        steps['bilevel'] = lambda b: bilevel_step(search, search_optim, b, b)

    g = torch.Generator().manual_seed(0)
    size = args.input_size
    batch = dict(
        inputs=torch.randint(
            0,
            256, (args.batch_size, 3, size, size),
            generator=g,
            dtype=torch.uint8).to(device),
        data_samples=[
            DataSample().set_gt_label(i % num_classes)
            for i in range(args.batch_size)
        ])
    return {name: steps[name] for name in args.steps}, batch


def main(argv=None):
    args = parse_args(argv)
    import torch

    from gmpq_mm.quantization.kernel_backend import (get_kernel_backend,
                                                     plan_run,
                                                     set_kernel_backend)
    device = torch.device(args.device)
    on_gpu = device.type == 'cuda'
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit('benchmark_cuda.py needs a CUDA device (or '
                         '--device cpu for a smoke test)')
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    set_kernel_backend(args.backend)
    plan_run(10**9)  # 'auto' as a long training run gets it

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    steps, batch = build(args, device)
    name_of_device = torch.cuda.get_device_name() if on_gpu else 'CPU'
    print(f'{name_of_device} | ResNet-18 {"CIFAR " if args.cifar else ""}'
          f'{args.input_size}px, batch {args.batch_size}, '
          f'{"AMP fp16" if args.amp else "fp32"}, quantization kernels '
          f'{args.backend}, torch {torch.__version__}')
    results = {}
    for name, step in steps.items():
        sync()
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.warmup):
            step(batch)
        sync()
        warmup_s = time.perf_counter() - start
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            step(batch)
            sync()
            times.append(time.perf_counter() - start)
        images = args.batch_size * (2 if name == 'bilevel' else 1)
        median = statistics.median(times)
        results[name] = dict(
            step_s=median,
            images_per_s=images / median,
            step_s_min=min(times),
            step_s_max=max(times),
            peak_gib=(torch.cuda.max_memory_allocated() /
                      2**30 if on_gpu else float('nan')),
            warmup_s=warmup_s,
            kernels=get_kernel_backend() if name != 'fp' else '-')
    fp = results.get('fp')
    print(f'{"step":<8} {"ms/step":>8} {"img/s":>8} {"x FP time":>9} '
          f'{"peak GiB":>8} {"x FP mem":>8} {"warm-up s":>9} kernels')
    for name, r in results.items():
        t_ratio = r['step_s'] / fp['step_s'] if fp else float('nan')
        m_ratio = r['peak_gib'] / fp['peak_gib'] if fp else float('nan')
        r.update(time_vs_fp=t_ratio, mem_vs_fp=m_ratio)
        print(f'{name:<8} {r["step_s"] * 1e3:>8.1f} '
              f'{r["images_per_s"]:>8.0f} {t_ratio:>9.2f} '
              f'{r["peak_gib"]:>8.2f} {m_ratio:>8.2f} {r["warmup_s"]:>9.1f} '
              f'{r["kernels"]}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(
                dict(
                    vars(args),
                    device_name=name_of_device,
                    torch=torch.__version__,
                    results=results),
                f,
                indent=2)


if __name__ == '__main__':
    main()
