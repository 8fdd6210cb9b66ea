"""Export a finetuned checkpoint as a packed low-bit artifact, and run it.

Floor 2 around :mod:`gmpq_mm.quantization.export` (which packs and checks
the tensors): this module builds the network from an OpenMMLab config,
writes a self-contained model config into the artifact (the policy inlined,
the activation signedness spelled out, no ``init_cfg`` to download), and
rebuilds a runnable ``ImageClassifier`` from an artifact alone.

    from gmpq_mm.apis import export_checkpoint, build_deployed_model
    export_checkpoint('configs/gmpq/finetune_r18_in1k.py', 'epoch_100.pth',
                      'r18_mixed.safetensors')
    model, meta = build_deployed_model('r18_mixed.safetensors')
    # images normalised as meta['config']['data_preprocessor'] says
    logits = model(images, mode='tensor')
"""
import copy
import os
import os.path as osp
from typing import Optional, Sequence, Tuple

import torch
from mmengine.config import Config, ConfigDict
from mmengine.registry import init_default_scope
from mmengine.runner import load_checkpoint
from torch import nn

from gmpq_mm.quantization.atomic_file import atomic_path
from gmpq_mm.quantization.convert import policy_from_model
from gmpq_mm.quantization.export import load_artifact, save_artifact
from gmpq_mm.quantization.layers import is_quantized_layer
from gmpq_mm.quantization.requant_point import POINT_STATE
from gmpq_mm.registry import MODELS
from gmpq_mm.utils import register_all_modules
from gmpq_mm.utils.bit_record import check_bit_widths, policy_source

__all__ = [
    'load_model', 'deploy_model_config', 'export_checkpoint',
    'build_deployed_model', 'check_deployable_config', 'DEPLOYABLE_TYPES',
    'ARTIFACT_TOLERANCE'
]
# The check of an exported artifact: the network rebuilt from the file alone
# runs the same torch ops on the same integer codes and scales as the
# checkpoint's (measured difference 0), so only float rounding is allowed
# (relative to the largest logit, at least 1), and the same top-1 class.
ARTIFACT_TOLERANCE = dict(max_abs_diff_rel=1e-4, batch_size=8)

# The only types an artifact's model config may name: an ImageClassifier
# of a (quantized) mmpretrain CNN and the layers inside it. Nothing here
# reads a file, downloads, or builds another model (a search classifier
# would load its teacher's config and checkpoint). Extend it for a new
# backbone after checking that building it reads no outside file.
DEPLOYABLE_TYPES = frozenset({
    'ImageClassifier', 'ClsDataPreprocessor', 'QuantizedBackbone', 'ResNet',
    'ResNet_CIFAR', 'ResNetV1c', 'ResNetV1d', 'ResNeXt', 'SEResNet',
    'SEResNeXt', 'MobileNetV2', 'MobileNetV3', 'ShuffleNetV2', 'RegNet',
    'GlobalAveragePooling', 'LinearClsHead', 'ClsHead', 'StackedLinearClsHead',
    'CrossEntropyLoss', 'LabelSmoothLoss', 'BN', 'BN1d', 'BN2d', 'SyncBN',
    'GN', 'LN', 'ReLU', 'ReLU6', 'HSwish', 'HSigmoid', 'Sigmoid', 'GELU',
    'SiLU', 'Swish', 'Conv2d', 'Conv', 'Linear'
})
# Keys that name outside files or another model: never in an artifact.
_FORBIDDEN_KEYS = ('teacher', 'teacher_checkpoint', 'init_cfg', 'pretrained',
                   'checkpoint', 'load_from', 'custom_imports')
# mmengine writes the registry scope of inherited configs as ``_scope_``.
_SCOPES = ('mmpretrain', 'mmengine', 'mmcv')


def _plain(obj):
    """ConfigDicts / tuples -> dicts / lists (JSON-able)."""
    if isinstance(obj, (ConfigDict, dict)):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _strip_init(obj):
    """Drop ``init_cfg`` / ``pretrained`` entries (weights come from the
    artifact; nothing is downloaded when it is rebuilt)."""
    if isinstance(obj, dict):
        return {
            k: _strip_init(v)
            for k, v in obj.items() if k not in ('init_cfg', 'pretrained')
        }
    if isinstance(obj, list):
        return [_strip_init(v) for v in obj]
    return obj


def as_config(config, cfg_options=None) -> Config:
    """A :class:`Config` from a file path, a Config (copied) or a dict, with
    ``cfg_options`` merged in."""
    if isinstance(config, (str, os.PathLike)):
        cfg = Config.fromfile(os.fspath(config))
    elif isinstance(config, Config):
        cfg = copy.deepcopy(config)
    else:
        cfg = Config(dict(config))
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    return cfg


def model_config(cfg: Config) -> dict:
    """The ``model`` of ``cfg`` as a plain dict, with the config's top-level
    ``data_preprocessor`` folded in (what building it alone needs)."""
    model_cfg = _plain(cfg.model)
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor',
                             _plain(cfg.data_preprocessor))
    return model_cfg


def load_model(config,
               checkpoint: Optional[str] = None,
               cfg_options=None,
               device: str = 'cpu') -> Tuple[nn.Module, Config]:
    """Build the model of ``config`` and load ``checkpoint`` strictly.

    No ``init_weights`` is run (the checkpoint provides every weight). A
    checkpoint whose recorded bit widths differ from the model's is refused
    (:func:`gmpq_mm.utils.bit_record.check_bit_widths`).

    Returns:
        tuple: the model in eval mode and the (merged) config.
    """
    cfg = as_config(config, cfg_options)
    register_all_modules()
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    model = MODELS.build(model_config(cfg))
    if checkpoint is not None:
        try:
            loaded = load_checkpoint(
                model,
                checkpoint,
                map_location='cpu',
                strict=True,
                logger='silent')
        except RuntimeError as err:
            hint = ''
            if POINT_STATE in str(err):
                hint = (' (requantization points: the checkpoint was '
                        'trained with a different model.backbone.'
                        'requant_points than the config has)')
            raise RuntimeError(f'{checkpoint}: does not fit the model of '
                               f'the config{hint}: {err}') from None
        check_bit_widths(model, loaded, checkpoint,
                         policy_source(cfg, 'the config'))
    return model.to(device).eval(), cfg


def deploy_model_config(cfg: Config, model: nn.Module) -> dict:
    """The model config that rebuilds ``model`` without outside files.

    A ``QuantizedBackbone`` gets its policy inlined (from the built layers,
    so a uniform ``w_bits`` / ``a_bits`` becomes a policy too) and its
    ``signed`` flags spelled out per layer (no probe forward at rebuild);
    every ``init_cfg`` is dropped.
    """
    model_cfg = _strip_init(model_config(cfg))
    backbone_cfg = model_cfg.get('backbone')
    backbone = getattr(model, 'backbone', None)
    if isinstance(backbone_cfg, dict) and isinstance(backbone, nn.Module) \
            and str(backbone_cfg.get('type', '')).endswith(
                'QuantizedBackbone'):
        policy = policy_from_model(backbone)
        backbone_cfg['policy'] = policy
        backbone_cfg['w_bits'] = None
        backbone_cfg['a_bits'] = None
        backbone_cfg['signed'] = {
            name: bool(m.signed)
            for name, m in backbone.named_modules() if is_quantized_layer(m)
        }
    return model_cfg


def check_deployable_config(model_cfg, where: str = '<config>') -> None:
    """Refuse a model config an artifact must not hold.

    Only plain JSON values, only :data:`DEPLOYABLE_TYPES` as ``type``, no
    key that names a file or another model (``teacher``, ``init_cfg``,
    ``checkpoint`` ...), and the ``policy`` inlined (a dict, not a path).
    So building it neither executes a config file nor unpickles anything.

    Raises:
        ValueError: Naming ``where`` and the offending key.
    """

    def walk(node, key_path):
        if isinstance(node, dict):
            for key, value in node.items():
                here = f'{key_path}.{key}' if key_path else str(key)
                if not isinstance(key, str):
                    raise ValueError(f'{where}: non-string key at {here}')
                if key in _FORBIDDEN_KEYS:
                    raise ValueError(
                        f'{where}: the model config holds {here!r}: an '
                        'artifact names no outside file or model')
                if key == '_scope_':
                    if value not in _SCOPES:
                        raise ValueError(f'{where}: {here}={value!r} is not '
                                         f'one of the scopes {_SCOPES}')
                elif key == 'type':
                    scope, _, name = value.rpartition('.') if isinstance(
                        value, str) else ('', '', None)
                    if name not in DEPLOYABLE_TYPES or \
                            (scope and scope not in _SCOPES):
                        raise ValueError(
                            f'{where}: {here}={value!r} is not a deployable '
                            'type (allowed: ImageClassifier of a quantized '
                            'mmpretrain CNN; see DEPLOYABLE_TYPES)')
                elif key == 'policy' and value is not None and \
                        not isinstance(value, dict):
                    raise ValueError(f'{where}: {here} must be the policy '
                                     'itself (a dict), not a file name')
                else:
                    walk(value, here)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f'{key_path}[{i}]')
        elif not (node is None or isinstance(node, (str, bool, int, float))):
            raise ValueError(f'{where}: {key_path} holds a '
                             f'{type(node).__name__}, not plain JSON')

    if not isinstance(model_cfg, dict):
        raise ValueError(f'{where}: the artifact holds no model config to '
                         'rebuild the network from')
    walk(model_cfg, '')
    if str(model_cfg.get('type', '')).split('.')[-1] != 'ImageClassifier':
        raise ValueError(f'{where}: the model type must be ImageClassifier, '
                         f'got {model_cfg.get("type")!r}')


def _policy_of(model: nn.Module, input_shape=None) -> Optional[dict]:
    has_quant = any(is_quantized_layer(m) for m in model.modules())
    if not has_quant:
        return None
    backbone = getattr(model, 'backbone', model)
    return policy_from_model(backbone, input_shape=input_shape)


def export_checkpoint(config,
                      checkpoint: str,
                      out: str,
                      cfg_options=None,
                      verify: bool = True,
                      input_shape: Optional[Sequence[int]] = None) -> dict:
    """Write the artifact of a (finetuned) checkpoint.

    Args:
        config: Config file, ``Config`` or dict.
        checkpoint: The checkpoint file.
        out: The ``.safetensors`` artifact to write.
        cfg_options: Overrides for the config.
        verify: Rebuild the network from the artifact alone and compare its
            logits with the checkpoint's on a random batch.
        input_shape: ``(C, H, W)`` for the complexity report and the check;
            default the config's test crop.

    Returns:
        dict: ``path``, ``bytes``, ``size_mb`` (file), ``model_size_mb``
        (the complexity report's), ``size_ratio``, ``complexity`` summary,
        ``max_abs_diff`` (with ``verify``) and ``input_shape``.
    """
    from gmpq_mm.utils.report import infer_input_shape, model_complexity

    model, cfg = load_model(config, checkpoint, cfg_options)
    shape = tuple(infer_input_shape(cfg, model, input_shape))
    complexity = model_complexity(model, cfg, input_shape=shape)
    model_cfg = deploy_model_config(cfg, model)
    check_deployable_config(model_cfg,
                            getattr(cfg, 'filename', None) or '<config>')
    policy = _policy_of(model, input_shape=shape)
    extra = dict(
        source_config=getattr(cfg, 'filename', None),
        source_checkpoint=osp.basename(checkpoint),
        input_shape=list(shape),
        dataset_meta=None)
    if complexity is not None:
        extra['complexity'] = {
            k: complexity[k]
            for k in ('bitops_quantized', 'bitops_total', 'size_mb',
                      'fp_size_mb', 'compression', 'compression_quantized',
                      'mean_w_bits', 'mean_a_bits')
        }
    out = os.fspath(out)
    with atomic_path(out, suffix='.tmp') as tmp:
        summary = save_artifact(
            tmp, model, config=model_cfg, policy=policy, extra=extra)
        if verify:
            summary.update(_check_rebuilt(model, tmp, shape, out, checkpoint))
    summary['path'] = out
    summary['size_mb'] = summary['bytes'] / 1e6
    summary['input_shape'] = list(shape)
    if complexity is not None:
        summary['complexity'] = extra['complexity']
        summary['model_size_mb'] = complexity['size_mb']
        summary['size_ratio'] = summary['size_mb'] / complexity['size_mb']
    return summary


def _check_rebuilt(model: nn.Module, path: str, shape, out: str,
                   checkpoint: str) -> dict:
    """Rebuild the network from the artifact at ``path`` alone and compare
    its logits with ``model``'s on random inputs (:data:`ARTIFACT_TOLERANCE`);
    raises ``RuntimeError`` when they differ, so the file is not kept."""
    deployed, _ = build_deployed_model(path)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(
        (ARTIFACT_TOLERANCE['batch_size'], ) + tuple(shape), generator=gen)
    with torch.no_grad():
        ref = model(x, mode='tensor')
        got = deployed(x, mode='tensor')
    diff = float((ref - got).abs().max())
    bound = ARTIFACT_TOLERANCE['max_abs_diff_rel'] * max(
        float(ref.abs().max()), 1.0)
    agree = float((ref.argmax(1) == got.argmax(1)).float().mean())
    if diff > bound or agree < 1.0:
        raise RuntimeError(
            f'{out}: the network rebuilt from the artifact does not '
            f'reproduce the checkpoint {checkpoint}: max |logits difference| '
            f'{diff:.3g} (allowed {bound:.3g}), top-1 agreement {agree:.0%} '
            '(required 100%); nothing written')
    return dict(max_abs_diff=diff, max_abs_diff_allowed=bound)


def build_deployed_model(path: str,
                         device: str = 'cpu') -> Tuple[nn.Module, dict]:
    """Rebuild the runnable network of an artifact (eval mode).

    The model config stored in the artifact is checked against an
    allow-list (:func:`check_deployable_config`: deployable types only, no
    file names, no teacher), so rebuilding executes no config file and
    unpickles nothing; it is then built and the unpacked state loaded
    strictly. Its outputs equal the exported fake-quantized network's.

    Returns:
        tuple: the model and the artifact's metadata.

    Raises:
        ArtifactError: (``ValueError``) naming the file, for a truncated or
            altered artifact, or one without a deployable model config.
    """
    from gmpq_mm.quantization.export import ArtifactError

    state, meta = load_artifact(path)
    model_cfg = meta.get('config')
    try:
        check_deployable_config(model_cfg, path)
    except ValueError as err:
        raise ArtifactError(str(err)) from None
    register_all_modules()
    init_default_scope('mmpretrain')
    model = MODELS.build(copy.deepcopy(model_cfg))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ArtifactError(f'{path}: tensors do not fit the stored model '
                            f'config: {err}') from None
    return model.to(device).eval(), meta
