"""Top-1 of an ONNX model on a config's test set, and its agreement with
the PyTorch checkpoint it was exported from.

    python tools/deploy/test_onnx.py CONFIG MODEL.onnx [--checkpoint CKPT]
        [--json result.json] [--cfg-options ...]

The config's ``test_dataloader`` pipeline and the model's data preprocessor
(mean / std) make the normalised images the ONNX model reads; onnxruntime's
CPU provider (all graph optimizations on) runs it. With ``--checkpoint``
the PyTorch network of the config runs beside it on the same images: the
tool then prints both top-1 figures and the fraction of images on which
the two predict the same class.
"""
import argparse
import json
import os.path as osp
import time

from gmpq_mm.utils.cli import add_cfg_options


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Top-1 of an ONNX model on the config\'s test set')
    parser.add_argument('config', help='config file (its test_dataloader)')
    parser.add_argument('model', help='the .onnx file')
    parser.add_argument(
        '--checkpoint',
        help='the PyTorch checkpoint to compare with (top-1 agreement)')
    parser.add_argument('--batch-size', type=int, default=100)
    parser.add_argument(
        '--threads', type=int, default=0, help='onnxruntime threads')
    parser.add_argument('--json', help='write the result to this JSON file')
    add_cfg_options(parser)
    return parser.parse_args(argv)


def evaluate(cfg, model_path, checkpoint=None, batch_size=100, threads=0):
    """``onnx_top1``, ``images``; with ``checkpoint`` also ``torch_top1``,
    ``agreement`` and ``differ`` (images whose top-1 class differs)."""
    import torch

    from gmpq_mm.apis import load_model
    from gmpq_mm.apis.onnx_data import dataset_batches
    from gmpq_mm.deploy.ort_check import open_session

    model, cfg = load_model(cfg, checkpoint)
    sess = open_session(model_path, threads=threads)
    feed = sess.get_inputs()[0].name
    hits_onnx = hits_torch = same = total = 0
    for images, labels in dataset_batches(
            cfg, model, 'test', batch_size=batch_size):
        pred = sess.run(None, {feed: images})[0].argmax(1)
        hits_onnx += int((pred == labels).sum())
        if checkpoint is not None:
            with torch.no_grad():
                ref = model(
                    torch.from_numpy(images), mode='tensor').argmax(1).numpy()
            hits_torch += int((ref == labels).sum())
            same += int((ref == pred).sum())
        total += len(labels)
    if not total:
        raise ValueError('the test set of the config is empty')
    result = dict(images=total, onnx_top1=100.0 * hits_onnx / total)
    if checkpoint is not None:
        result.update(
            torch_top1=100.0 * hits_torch / total,
            agreement=100.0 * same / total,
            differ=total - same)
    return result


def main(argv=None):
    args = parse_args(argv)
    from mmengine.config import Config

    from gmpq_mm.utils.cli import register_for_tool
    register_for_tool()
    for path, what in ((args.config, 'config'), (args.model, 'ONNX model'),
                       (args.checkpoint, 'checkpoint')):
        if path is not None and not osp.isfile(path):
            raise SystemExit(f'error: {what} file not found: {path}')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.load_from = None
    start = time.time()
    try:
        result = evaluate(cfg, args.model, args.checkpoint, args.batch_size,
                          args.threads)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        raise SystemExit(f'error: {err}')
    result.update(model=args.model, seconds=time.time() - start)
    line = (f'{args.model}: top-1 {result["onnx_top1"]:.2f}% on '
            f'{result["images"]} test images (onnxruntime)')
    if 'torch_top1' in result:
        line += (f'; PyTorch {result["torch_top1"]:.2f}%, top-1 agreement '
                 f'{result["agreement"]:.2f}% ({result["differ"]} differ)')
    print(line)
    if args.json:
        from gmpq_mm.quantization.atomic_file import write_text_atomic
        write_text_atomic(args.json, json.dumps(result, indent=2) + '\n')
    return result


if __name__ == '__main__':
    main()
