"""Export a finetuned checkpoint as an ONNX model, checked by onnxruntime.

Floor 2 around :mod:`gmpq_mm.deploy` (the export-time layers, the graph
building and the onnxruntime checks): this module loads the network of an
OpenMMLab config and checkpoint, refuses what is not a finetuned fixed-bit
network, exports ``images -> logits`` with a dynamic batch, and runs the
file in onnxruntime (CPU) beside the PyTorch model before it is moved to
its final path. Nothing is written at ``out`` unless every check passed.

    from gmpq_mm.apis import export_onnx_checkpoint
    export_onnx_checkpoint('configs/gmpq/finetune_r18_in1k.py',
                           'epoch_100.pth', 'r18_mixed.onnx')

Modes (:data:`ONNX_MODES`):

* ``integer`` (default): onnxruntime's CPU provider runs every conv with a
  quantized weight and input as ``QLinearConv`` (BatchNorm folded, outputs
  requantized, residual adds as ``QLinearAdd``; see
  :mod:`gmpq_mm.deploy.onnx_integer`);
* ``float-qdq``: Q/DQ around float Conv / Gemm, BatchNorm unfolded, exactly
  the PyTorch function (explicit quantization as TensorRT reads it);
* ``fp``: the float network without quantizers (a benchmark's baseline).

The model's input is the normalised image batch ``(N, C, H, W)`` (float32;
the mean / std are in the model's metadata), its output the logits
``(N, num_classes)``.
"""
import os
import os.path as osp
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from gmpq_mm.deploy.onnx_graph import (ONNX_OPSET, check_qdq_model,
                                       finalize_qdq_model, set_metadata)
from gmpq_mm.deploy.onnx_integer import (INTEGER_OPS, check_integer_model,
                                         integerize)
from gmpq_mm.deploy.ort_check import (compare_logits, missing_deploy_packages,
                                      optimized_nodes, run_onnxruntime,
                                      tensor_ranges)
from gmpq_mm.deploy.qdq_modules import (float_module, qdq_layer_info,
                                        qdq_module, requant_point_count)
from gmpq_mm.quantization.atomic_file import atomic_path
from gmpq_mm.quantization.convert import policy_from_model
from gmpq_mm.quantization.layers import is_quantized_layer

__all__ = [
    'ONNX_MODES', 'ONNX_TOLERANCES', 'LogitsOnly',
    'check_finetuned_checkpoint', 'export_onnx_checkpoint', 'export_onnx_model'
]

ONNX_MODES = ('integer', 'float-qdq', 'fp')
# What the check after export allows between onnxruntime and the PyTorch
# checkpoint on the verification batch, per mode.
#
# float-qdq: QuantizeLinear divides by r / n where the training layer
# multiplies by n / r, and the two runtimes sum the convolutions in
# different orders: where an activation sits within a float rounding of a
# level boundary it can land one level apart, which at 2-3 bits moves that
# sample's logits visibly. Measured (random inputs, see
# docs/user_guides/export.md): relative L2 error 7.5e-7 on the 28-px demo
# network, 5.8e-3 on ResNet-18 and 5.3e-3 on ResNet-50 W2A2 at 224 px, top-1
# unchanged; one weight scale off by 5% gives 3.6e-2 and 91% top-1.
#
# integer: adds what the PyTorch model does not have: 8-bit points on the
# residual branches (range from the calibration images), the bias rounded
# to int32, and integer requantization of each conv output. Measured on
# the calibration images (docs/user_guides/export.md); the bound is set
# above those and below what one wrong scale gives.
#
# integer-matched: an integer graph whose every 8-bit point is the model's
# own (requant_points) and whose int32 bias the model emulates in eval:
# the same function up to float order. Measured 1.8e-7 and 100 % on the
# demo network, 9.9e-5 on its int8_runtime twin (docs/user_guides/export.md);
# held to the float-QDQ bound.
ONNX_TOLERANCES = {
    'float-qdq': dict(max_rel_l2=2e-2, min_top1_agreement=0.95),
    'integer-matched': dict(max_rel_l2=2e-2, min_top1_agreement=0.95),
    'integer': dict(max_rel_l2=1e-1, min_top1_agreement=0.9),
    'fp': dict(max_rel_l2=1e-4, min_top1_agreement=0.99),
}


class LogitsOnly(nn.Module):
    """``images -> logits`` of an mmpretrain classifier (what is traced)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs):
        out = self.model(inputs, mode='tensor')
        if isinstance(out, (tuple, list)):
            out = out[-1]
        return out


def check_finetuned_checkpoint(checkpoint: str) -> None:
    """Refuse a checkpoint that is not a finetuned fixed-bit network.

    A search checkpoint holds architecture parameters (``alpha_w`` /
    ``alpha_a``); a full-precision one holds no activation range
    (``act_range``). Both are refused with a ``ValueError`` naming the file.
    """
    from gmpq_mm.engine.checkpoint_load import load_checkpoint_file
    ckpt = load_checkpoint_file(checkpoint, map_location='cpu')
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f'{checkpoint}: not a checkpoint (no state dict)')
    keys = list(state)
    alphas = [k for k in keys if k.endswith(('.alpha_w', '.alpha_a'))]
    if alphas:
        raise ValueError(
            f'{checkpoint}: a search (supernet) checkpoint ({len(alphas)} '
            f'architecture parameters, e.g. {alphas[0]!r}), not a finetuned '
            'fixed-bit network; finetune the searched policy first and '
            'export that checkpoint')
    if not any(k.endswith('.act_range') for k in keys):
        raise ValueError(
            f'{checkpoint}: a full-precision checkpoint (no quantizer state '
            '`act_range` in it), not a finetuned quantized network: there '
            'is nothing to export as QDQ')


def _metadata(cfg, model, checkpoint, shape) -> dict:
    backbone = getattr(model, 'backbone', model)
    meta = dict(
        format='gmpq-onnx-qdq',
        source_checkpoint=osp.basename(checkpoint),
        source_config=getattr(cfg, 'filename', None) or '',
        input_shape=['N'] + list(shape),
        input='normalised images (x - mean) / std, float32',
        output='logits')
    pre = cfg.get('data_preprocessor') or cfg.model.get('data_preprocessor')
    if pre:
        meta['data_preprocessor'] = {
            k: (list(v) if isinstance(v, (list, tuple)) else v)
            for k, v in dict(pre).items() if k in ('mean', 'std', 'to_rgb')
        }
    meta['policy'] = policy_from_model(backbone)
    return meta


def _export(module: nn.Module, path: str, shape) -> None:
    from gmpq_mm.compat import export_onnx
    with torch.no_grad():
        export_onnx(
            module, (torch.zeros((2, ) + tuple(shape)), ),
            path,
            opset_version=ONNX_OPSET,
            input_names=['input'],
            output_names=['logits'],
            dynamic_axes={
                'input': {
                    0: 'batch'
                },
                'logits': {
                    0: 'batch'
                }
            },
            do_constant_folding=True)


def _integer(proto, layers, calib: np.ndarray, path: str) -> dict:
    """Rewrite ``proto`` for integer kernels; the 8-bit points get the
    ranges of the float-QDQ graph on ``calib``."""
    import onnx
    before = onnx.ModelProto()
    before.CopyFrom(proto)
    info = integerize(proto, layers,
                      lambda names: tensor_ranges(before, names, calib))
    check_integer_model(proto, layers, info['integer_layers'])
    return info


def _kernels(path: str, names: Sequence[str]) -> dict:
    """What onnxruntime runs for the integer layers; warns, naming them,
    when some of them still run as a float Conv (an onnxruntime without
    the integer kernels or the QDQ fusion)."""
    nodes = optimized_nodes(path)
    counts = {}
    for op, _ in nodes:
        counts[op] = counts.get(op, 0) + 1
    float_convs = {name for op, name in nodes if op == 'Conv'}
    fallback = [n for n in names if n in float_convs]
    integer = sum(counts.get(op, 0) for op in INTEGER_OPS)
    if fallback or integer < len(names):
        import onnxruntime
        warnings.warn(
            f'{path}: onnxruntime {onnxruntime.__version__} runs '
            f'{len(fallback) or len(names) - integer} of {len(names)} '
            f'quantized convs as float Conv, not QLinearConv: '
            f'{", ".join(fallback) or "(names lost in fusion)"}; the file is '
            'correct but not faster',
            stacklevel=3)
    return dict(ops=counts, integer_convs=integer, fallback=fallback)


def export_onnx_model(model: nn.Module,
                      out: str,
                      input_shape: Sequence[int],
                      mode: str = 'integer',
                      metadata: Optional[dict] = None,
                      verify: bool = True,
                      inputs: Optional[np.ndarray] = None,
                      batch_size: int = 32,
                      source: str = '') -> dict:
    """Write the ONNX model of a loaded fixed-bit network, checked: the one
    export entry point (the tool, the benchmark and
    :func:`export_onnx_checkpoint` call it).

    Args:
        model: The finetuned classifier (eval mode), e.g. from
            :func:`gmpq_mm.apis.load_model`.
        out: The ``.onnx`` file; written (atomically) only if every check
            passes.
        input_shape: ``(C, H, W)``.
        mode: One of :data:`ONNX_MODES`.
        metadata: Written as the model's ``metadata_props``.
        verify: Run the file in onnxruntime (CPU) and compare with the
            PyTorch model (:data:`ONNX_TOLERANCES`).
        inputs: Images (normalised, ``(N, C, H, W)``) for the ranges of the
            integer graph's 8-bit points and for the check; default
            ``batch_size`` random normal images.
        batch_size: Size of the random batch when ``inputs`` is None.
        source: Named in errors (the checkpoint).

    Returns:
        dict: ``path``, ``bytes``, ``size_mb``, ``mode``, ``input_shape``,
        ``opset``, ``nodes``; for the QDQ modes ``quantize_linear``,
        ``dequantize_linear``, ``quantized_layers``, ``layers``; for
        ``integer`` also ``integer_layers``, ``added_points`` and
        ``onnxruntime`` (op counts of the optimized graph, ``integer_convs``,
        ``fallback``); ``model_points``: the model's calibrated
        requantization points written as Q / DQ pairs; with ``verify`` the
        dict ``verify``.
    """
    if mode not in ONNX_MODES:
        raise ValueError(f'mode must be one of {ONNX_MODES}, got {mode!r}')
    import onnx
    shape = tuple(input_shape)
    source = source or out
    if mode == 'fp':
        exported = LogitsOnly(float_module(model)).eval()
        reference = exported
        layers = {}
        model_points = 0
    else:
        try:
            exported = LogitsOnly(qdq_module(model)).eval()
        except ValueError as err:
            raise ValueError(f'{source}: {err}') from None
        reference = LogitsOnly(model).eval()
        layers = qdq_layer_info(exported)
        model_points = requant_point_count(exported)
    if inputs is None:
        gen = torch.Generator().manual_seed(0)
        inputs = torch.randn((batch_size, ) + shape, generator=gen).numpy()
    inputs = np.ascontiguousarray(inputs, np.float32)
    # A check of the policy against a deployment target fits here, before
    # anything is traced or written.
    out = os.fspath(out)
    with atomic_path(out, suffix='.tmp') as tmp:
        _export(exported, tmp, shape)
        proto = onnx.load(tmp)
        summary = dict(mode=mode, model_points=model_points)
        if layers:
            finalize_qdq_model(proto, layers)
            summary.update(check_qdq_model(proto, layers))
        if mode == 'integer':
            summary.update(_integer(proto, layers, inputs, tmp))
        set_metadata(proto, dict(metadata or {}, onnx_mode=mode))
        counts = {}
        for node in proto.graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        summary['nodes'] = counts
        summary['opset'] = ONNX_OPSET
        onnx.save(proto, tmp)
        if mode == 'integer':
            summary['onnxruntime'] = _kernels(tmp, summary['integer_layers'])
        if verify:
            check = mode
            if mode == 'integer' and model_points and \
                    not summary['added_points']:
                check = 'integer-matched'
            summary['verify'] = _verify(reference, tmp, inputs, check, out,
                                        source)
    summary.update(
        path=out,
        bytes=osp.getsize(out),
        size_mb=osp.getsize(out) / 1e6,
        input_shape=list(shape),
        quantized_layers=len(layers))
    return summary


def _verify(reference, path, inputs, check, out, source) -> dict:
    tol = ONNX_TOLERANCES[check]
    with torch.no_grad():
        ref = torch.cat([
            reference(torch.from_numpy(inputs[i:i + 64]))
            for i in range(0, len(inputs), 64)
        ]).float().numpy()
    got = run_onnxruntime(path, inputs)
    cmp = compare_logits(ref, got, tol)
    if not cmp['ok']:
        raise RuntimeError(
            f'{out}: onnxruntime does not reproduce the checkpoint {source} '
            f'({check} graph) on {len(inputs)} inputs: relative L2 error of '
            f'the logits {cmp["rel_l2"]:.3g} (allowed {tol["max_rel_l2"]:g}),'
            f' top-1 agreement {cmp["top1_agreement"]:.0%} (required '
            f'{tol["min_top1_agreement"]:.0%}); nothing written')
    cmp.pop('ok')
    return dict(cmp, batch_size=len(inputs), tolerances=dict(tol), check=check)


def export_onnx_checkpoint(config,
                           checkpoint: str,
                           out: str,
                           cfg_options=None,
                           verify: bool = True,
                           input_shape: Optional[Sequence[int]] = None,
                           batch_size: int = 32,
                           mode: str = 'integer',
                           inputs: Optional[np.ndarray] = None,
                           calib_images: int = 64) -> dict:
    """Write the ONNX model of a finetuned checkpoint, checked.

    Args:
        config: Config file, ``Config`` or dict (as for ``load_model``).
        checkpoint: The finetuned checkpoint.
        out: The ``.onnx`` file; written only if every check passes.
        cfg_options: Overrides for the config.
        verify: Run the file in onnxruntime (CPU) and compare with the
            PyTorch model (:data:`ONNX_TOLERANCES`).
        input_shape: ``(C, H, W)``; default the config's test crop.
        batch_size: Size of the random batch when ``inputs`` is None (the
            trace uses 2, so a different size also checks the dynamic
            batch).
        mode: One of :data:`ONNX_MODES` (default ``integer``).
        inputs: Normalised images for the integer graph's 8-bit ranges and
            the check; default (``integer``) the first ``calib_images``
            training images through the test pipeline
            (:func:`gmpq_mm.apis.onnx_data.calibration_images`), or random
            ones, with a warning, when the training data cannot be read;
            random ones for the other modes.
        calib_images: See ``inputs``.

    Returns:
        dict: as :func:`export_onnx_model`.

    Raises:
        ValueError: naming the checkpoint for a search / FP checkpoint;
        ImportError: without ``onnx`` / ``onnxruntime``;
        RuntimeError: if the graph or the onnxruntime check fails.
    """
    from gmpq_mm.apis.deploy import load_model
    from gmpq_mm.engine.checkpoint_load import ReadOnce
    from gmpq_mm.utils.report import infer_input_shape

    if mode not in ONNX_MODES:
        raise ValueError(f'mode must be one of {ONNX_MODES}, got {mode!r}')
    missing = missing_deploy_packages(with_runtime=verify or mode == 'integer')
    if missing:
        raise ImportError(
            f'ONNX export needs {" and ".join(missing)}: pip install '
            '"gmpq_mm[deploy]" (or pip install onnx onnxruntime)')
    with ReadOnce():  # checked and loaded from one unpickling
        check_finetuned_checkpoint(checkpoint)
        model, cfg = load_model(config, checkpoint, cfg_options)
    if not any(is_quantized_layer(m) for m in model.modules()):
        raise ValueError(f'{checkpoint}: the network of the config has no '
                         'quantized layer; use a finetune config')
    shape = tuple(infer_input_shape(cfg, model, input_shape))
    calibration = 'given' if inputs is not None else f'{batch_size} random'
    if inputs is None and mode == 'integer' and calib_images:
        from gmpq_mm.apis.onnx_data import calibration_images
        try:
            inputs = calibration_images(cfg, model, calib_images)
            calibration = f'{len(inputs)} training images'
        except Exception as err:  # no data here: say so, go on
            warnings.warn(
                f'cannot read the training images of the config for the '
                f'8-bit ranges of the integer graph ({type(err).__name__}: '
                f'{err}); using {batch_size} random inputs instead: check '
                'the accuracy of the file on real images '
                '(tools/deploy/test_onnx.py)',
                stacklevel=2)
    summary = export_onnx_model(
        model,
        out,
        shape,
        mode=mode,
        metadata=_metadata(cfg, model, checkpoint, shape),
        verify=verify,
        inputs=inputs,
        batch_size=batch_size,
        source=checkpoint)
    summary['calibration'] = calibration
    return summary
