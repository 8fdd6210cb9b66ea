"""What a model config says about its bits, as a small JSON-able record.

``tools/test.py`` writes it into its ``--out`` JSON (key ``quantization``)
so that later analyses (``tools/analysis/pareto.py``) know which policy or
uniform bits a result was measured with, without re-reading the config.
Plain mapping access only: works on a ``Config``'s ``model`` or a dict.
"""
import json
import os
from typing import Mapping, Optional

__all__ = [
    'WRAPPER_TYPES', 'config_type', 'inner_backbone', 'quantization_summary'
]

WRAPPER_TYPES = ('MixedPrecisionBackbone', 'QuantizedBackbone')


def config_type(cfg) -> str:
    """The bare class name of a config's ``type`` (scope dropped), or ''
    for anything that is not a mapping."""
    if not isinstance(cfg, Mapping):
        return ''
    return str(cfg.get('type', '')).rpartition('.')[2]


def inner_backbone(backbone_cfg):
    """The FP backbone config inside (nested) gmpq wrapper configs."""
    while config_type(backbone_cfg) in WRAPPER_TYPES:
        backbone_cfg = backbone_cfg['backbone']
    return backbone_cfg


def _plain(value):
    """ConfigDict / tuples -> plain JSON types."""
    return json.loads(json.dumps(value))


def quantization_summary(model_cfg: Mapping) -> Optional[dict]:
    """The gmpq backbone wrapper of ``model_cfg`` and its bit settings.

    Returns:
        dict | None: None for a full-precision model (no gmpq wrapper),
        else ``backbone`` (``'QuantizedBackbone'`` or
        ``'MixedPrecisionBackbone'``), ``policy`` (the file path as
        configured, an inline policy dict, or None) and ``w_bits`` /
        ``a_bits`` (uniform bits of a QuantizedBackbone, the candidate
        lists of a supernet, or None).
    """
    backbone = model_cfg.get('backbone') if isinstance(model_cfg,
                                                       Mapping) else None
    if not isinstance(backbone, Mapping):
        return None
    kind = config_type(backbone)
    if kind not in WRAPPER_TYPES:
        return None
    policy = backbone.get('policy')
    if isinstance(policy, Mapping):
        policy = _plain(policy)
    elif policy is not None:
        policy = os.fspath(policy)
    return dict(
        backbone=kind,
        policy=policy,
        w_bits=_plain(backbone.get('w_bits')),
        a_bits=_plain(backbone.get('a_bits')))
