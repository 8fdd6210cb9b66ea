"""Training throughput on a GPU: images/s of each GMPQ step beside FP.

ResNet-18 (ImageNet stem) at ``--input-size``, built from the registered
classes, one optimizer update included in every step:

* ``fp``: mmpretrain ``ImageClassifier`` train step (what a finetune of the
  FP network costs);
* ``w4a4``: the same with ``QuantizedBackbone`` at W4A4 (the finetune);
* ``single`` / ``bilevel``: a GMPQ search step (supernet w2346a2346, frozen
  FP teacher, CE + attribution + complexity losses); ``bilevel`` is an arch
  step plus a weight step, so it sees two batches.

``--amp`` runs every step under mmengine's ``AmpOptimWrapper`` (fp16
autocast, dynamic loss scale). The quantizer backend follows
``GMPQ_QUANT_BACKEND`` (``eager`` or ``compile``). Batches stay on the GPU
(uint8, as a data loader delivers them), so the figures are of the model,
not of JPEG decoding. Ratios are against ``fp`` of the same run.

Example::

    python tools/analysis/benchmark_cuda.py --batch-size 128 --amp
"""
import argparse
import json
import os
import os.path as osp
import statistics
import tempfile
import time

STEPS = ('fp', 'w4a4', 'single', 'bilevel')


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
    parser.add_argument('--steps', nargs='+', choices=STEPS, default=STEPS)
    parser.add_argument('--json', help='write the numbers to this file')
    return parser.parse_args(argv)


def build(args, device):
    """Step callables (one optimizer update each) and a GPU batch."""
    import torch
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    from mmpretrain.structures import DataSample

    from gmpq_mm.engine import bilevel_step, single_level_step
    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    init_default_scope('mmpretrain')
    torch.manual_seed(0)
    backbone = dict(type='ResNet', depth=18)
    head = dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=512,
        loss=dict(type='CrossEntropyLoss'))
    preprocessor = dict(
        type='ClsDataPreprocessor',
        num_classes=1000,
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        to_rgb=False)
    fp_cfg = dict(
        type='ImageClassifier',
        backbone=backbone,
        neck=dict(type='GlobalAveragePooling'),
        head=head)
    wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic') \
        if args.amp else dict(type='OptimWrapper')
    sgd = dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=1e-4)

    def classifier(cfg):
        model = MODELS.build(dict(cfg, data_preprocessor=preprocessor))
        model.to(device).train()
        return model, build_optim_wrapper(model, dict(wrapper, optimizer=sgd))

    steps = {}
    if 'fp' in args.steps:
        fp, fp_optim = classifier(fp_cfg)
        steps['fp'] = lambda b: fp.train_step(b, optim_wrapper=fp_optim)
    if 'w4a4' in args.steps:
        q, q_optim = classifier(
            dict(
                fp_cfg,
                backbone=dict(
                    type='QuantizedBackbone',
                    backbone=backbone,
                    w_bits=4,
                    a_bits=4)))
        steps['w4a4'] = lambda b: q.train_step(b, optim_wrapper=q_optim)
    if {'single', 'bilevel'} & set(args.steps):
        teacher = MODELS.build(dict(fp_cfg, data_preprocessor=preprocessor))
        ckpt = osp.join(tempfile.mkdtemp(), 'teacher.pth')
        torch.save({'state_dict': teacher.state_dict()}, ckpt)
        search = MODELS.build(
            dict(
                type='GMPQSearchClassifier',
                backbone=dict(
                    type='MixedPrecisionBackbone',
                    backbone=backbone,
                    w_bits=[2, 3, 4, 6],
                    a_bits=[2, 3, 4, 6]),
                neck=dict(type='GlobalAveragePooling'),
                head=head,
                teacher=fp_cfg,
                teacher_checkpoint=ckpt,
                input_shape=(3, args.input_size, args.input_size),
                attribution_loss=dict(
                    type='AttributionRankLoss', loss_weight=40.),
                complexity_loss=dict(type='ComplexityLoss', loss_weight=3e-4),
                data_preprocessor=preprocessor)).to(device).train()
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
            DataSample().set_gt_label(i % 1000) for i in range(args.batch_size)
        ])
    return {name: steps[name] for name in args.steps}, batch


def main(argv=None):
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        raise SystemExit('benchmark_cuda.py needs a CUDA device')
    device = torch.device('cuda')
    torch.backends.cudnn.benchmark = True
    steps, batch = build(args, device)
    backend = os.environ.get('GMPQ_QUANT_BACKEND', 'eager')
    print(f'{torch.cuda.get_device_name()} | ResNet-18 {args.input_size}px, '
          f'batch {args.batch_size}, {"AMP fp16" if args.amp else "fp32"}, '
          f'quantizer backend {backend}, torch {torch.__version__}')
    results = {}
    for name, step in steps.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.warmup):
            step(batch)
        torch.cuda.synchronize()
        warmup_s = time.perf_counter() - start
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            step(batch)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        images = args.batch_size * (2 if name == 'bilevel' else 1)
        median = statistics.median(times)
        results[name] = dict(
            step_s=median,
            images_per_s=images / median,
            peak_gib=torch.cuda.max_memory_allocated() / 2**30,
            warmup_s=warmup_s)
    fp = results.get('fp')
    print(f'{"step":<8} {"ms/step":>8} {"img/s":>8} {"x FP time":>9} '
          f'{"peak GiB":>8} {"x FP mem":>8} {"warm-up s":>9}')
    for name, r in results.items():
        t_ratio = r['step_s'] / fp['step_s'] if fp else float('nan')
        m_ratio = r['peak_gib'] / fp['peak_gib'] if fp else float('nan')
        r.update(time_vs_fp=t_ratio, mem_vs_fp=m_ratio)
        print(f'{name:<8} {r["step_s"] * 1e3:>8.1f} '
              f'{r["images_per_s"]:>8.0f} {t_ratio:>9.2f} '
              f'{r["peak_gib"]:>8.2f} {m_ratio:>8.2f} {r["warmup_s"]:>9.1f}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(
                dict(
                    vars(args),
                    backend=backend,
                    device=torch.cuda.get_device_name(),
                    results=results),
                f,
                indent=2)


if __name__ == '__main__':
    main()
