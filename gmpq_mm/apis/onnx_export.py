"""Export a finetuned checkpoint as a QDQ ONNX model, checked by onnxruntime.

Floor 2 around :mod:`gmpq_mm.quantization.onnx_qdq` (the export-time layers,
the graph surgery and the checks): this module loads the network of an
OpenMMLab config and checkpoint, refuses what is not a finetuned fixed-bit
network, exports ``images -> logits`` with a dynamic batch, and runs the
file in onnxruntime (CPU) beside the PyTorch model before it is moved to
its final path. Nothing is written at ``out`` unless every check passed.

    from gmpq_mm.apis import export_onnx_checkpoint
    export_onnx_checkpoint('configs/gmpq/finetune_r18_in1k.py',
                           'epoch_100.pth', 'r18_mixed.onnx')

The model's input is the normalised image batch ``(N, C, H, W)`` (float32;
the mean / std are in the model's metadata), its output the logits
``(N, num_classes)``.
"""
import os
import os.path as osp
import tempfile
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from gmpq_mm.quantization.convert import policy_from_model
from gmpq_mm.quantization.layers import is_quantized_layer
from gmpq_mm.quantization.onnx_qdq import (ONNX_OPSET, check_qdq_model,
                                           finalize_qdq_model,
                                           missing_deploy_packages,
                                           qdq_layer_info, qdq_module,
                                           run_onnxruntime, set_metadata)

__all__ = [
    'ONNX_TOLERANCES', 'LogitsOnly', 'check_finetuned_checkpoint',
    'export_onnx_checkpoint'
]

# What the check after export allows between onnxruntime and the PyTorch
# checkpoint on the verification batch. QuantizeLinear divides by r / n
# where the training layer multiplies by n / r, and the two runtimes sum the
# convolutions in different orders: where an activation sits within a float
# rounding of a level boundary it can land one level apart, which at 2-3
# bits moves that sample's logits visibly. Measured (random inputs, see
# docs/user_guides/export.md): relative L2 error 7.5e-7 on the 28-px demo
# network, 5.8e-3 on ResNet-18 and 5.3e-3 on ResNet-50 W2A2 at 224 px, top-1
# unchanged; one weight scale off by 5% gives 3.6e-2 and 91% top-1. So the
# logits are compared as a whole (relative L2 error over the batch) and the
# predictions per sample.
ONNX_TOLERANCES = dict(
    max_rel_l2=2e-2,  # ||onnx - torch|| / ||torch|| over the batch's logits
    min_top1_agreement=0.95)  # fraction whose top-1 class must agree


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


def _compare(ref: np.ndarray, got: np.ndarray, tol: dict) -> dict:
    """Compare two logit batches against ``tol``; also reports how many
    samples agree to float precision (``exact``: within 1e-4 of the
    largest logit)."""
    per_sample = np.abs(ref - got).reshape(len(ref), -1).max(1)
    rel_l2 = float(np.linalg.norm(ref - got) / max(np.linalg.norm(ref), 1e-12))
    agree = float(np.mean(ref.argmax(1) == got.argmax(1)))
    exact = float(np.mean(per_sample <= 1e-4 * np.abs(ref).max()))
    return dict(
        rel_l2=rel_l2,
        max_abs_diff=float(per_sample.max()),
        exact=exact,
        top1_agreement=agree,
        ok=rel_l2 <= tol['max_rel_l2'] and agree >= tol['min_top1_agreement'])


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


def export_onnx_checkpoint(config,
                           checkpoint: str,
                           out: str,
                           cfg_options=None,
                           verify: bool = True,
                           input_shape: Optional[Sequence[int]] = None,
                           batch_size: int = 32) -> dict:
    """Write the QDQ ONNX model of a finetuned checkpoint, checked.

    Args:
        config: Config file, ``Config`` or dict (as for ``load_model``).
        checkpoint: The finetuned checkpoint.
        out: The ``.onnx`` file; written only if every check passes.
        cfg_options: Overrides for the config.
        verify: Run the file in onnxruntime (CPU) on a random batch and
            compare with the PyTorch model (:data:`ONNX_TOLERANCES`).
        input_shape: ``(C, H, W)``; default the config's test crop.
        batch_size: Size of the verification batch (the trace uses 2, so a
            different size also checks the dynamic batch).

    Returns:
        dict: ``path``, ``bytes``, ``size_mb``, ``input_shape``, ``opset``,
        ``quantize_linear``, ``dequantize_linear``, ``quantized_layers``,
        ``layers`` (per layer bits and distinct weight values), and with
        ``verify`` the dict ``verify`` (``rel_l2``, ``max_abs_diff``,
        ``exact``, ``top1_agreement``, ``batch_size``, ``tolerances``).

    Raises:
        ValueError: naming the checkpoint for a search / FP checkpoint;
        ImportError: without ``onnx`` / ``onnxruntime``;
        RuntimeError: if the graph or the onnxruntime check fails.
    """
    from gmpq_mm.apis.deploy import load_model
    from gmpq_mm.compat import export_onnx
    from gmpq_mm.utils.report import infer_input_shape

    missing = missing_deploy_packages(with_runtime=verify)
    if missing:
        raise ImportError(
            f'ONNX export needs {" and ".join(missing)}: pip install '
            '"gmpq_mm[deploy]" (or pip install onnx onnxruntime)')
    import onnx

    check_finetuned_checkpoint(checkpoint)
    model, cfg = load_model(config, checkpoint, cfg_options)
    if not any(is_quantized_layer(m) for m in model.modules()):
        raise ValueError(f'{checkpoint}: the network of the config has no '
                         'quantized layer; use a finetune config')
    try:
        exported = LogitsOnly(qdq_module(model)).eval()
    except ValueError as err:
        raise ValueError(f'{checkpoint}: {err}') from None
    shape = tuple(infer_input_shape(cfg, model, input_shape))
    layers = qdq_layer_info(exported)

    out = os.fspath(out)
    folder = osp.dirname(osp.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=folder, prefix=f'.{osp.basename(out)}.', suffix='.tmp')
    os.close(fd)
    try:
        example = torch.zeros((2, ) + shape)
        with torch.no_grad():
            export_onnx(
                exported, (example, ),
                tmp,
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
        proto = onnx.load(tmp)
        finalize_qdq_model(proto, layers)
        set_metadata(proto, _metadata(cfg, model, checkpoint, shape))
        summary = check_qdq_model(proto, layers)
        onnx.save(proto, tmp)
        if verify:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn((batch_size, ) + shape, generator=gen)
            with torch.no_grad():
                ref = model(x, mode='tensor').float().numpy()
            got = run_onnxruntime(tmp, x.numpy())
            cmp = _compare(ref, got, ONNX_TOLERANCES)
            summary['verify'] = dict(
                {
                    k: v
                    for k, v in cmp.items() if k != 'ok'
                },
                batch_size=batch_size,
                tolerances=dict(ONNX_TOLERANCES))
            if not cmp['ok']:
                raise RuntimeError(
                    f'{out}: onnxruntime does not reproduce the checkpoint '
                    f'{checkpoint} on {batch_size} random inputs: relative '
                    f'L2 error of the logits {cmp["rel_l2"]:.3g} (allowed '
                    f'{ONNX_TOLERANCES["max_rel_l2"]:g}), top-1 agreement '
                    f'{cmp["top1_agreement"]:.0%} (required '
                    f'{ONNX_TOLERANCES["min_top1_agreement"]:.0%}); nothing '
                    'written')
        os.replace(tmp, out)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
    summary.update(
        path=out,
        bytes=osp.getsize(out),
        size_mb=osp.getsize(out) / 1e6,
        input_shape=list(shape),
        quantized_layers=len(layers))
    return summary
