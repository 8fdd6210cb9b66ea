"""``QuantizedBackbone``: any mmpretrain CNN with fixed bits from a policy.

A builder, like :func:`MixedPrecisionBackbone`, for the same reason: names,
parameters and the backbone's own behaviour stay as they are, so FP ImageNet
weights and a policy searched on a CIFAR-stem twin both apply unchanged.
"""
from gmpq_mm.quantization.convert import to_quantized
from gmpq_mm.quantization.policy import validate_policy
from gmpq_mm.quantization.quantizers import SUPPORTED_BITS, check_bits
from gmpq_mm.registry import MODELS
from ..utils.requant_blocks import add_requant_points
from .mixed_precision_backbone import build_and_select, stem_in_channels


@MODELS.register_module()
def QuantizedBackbone(backbone,
                      policy=None,
                      w_bits=None,
                      a_bits=None,
                      include=None,
                      exclude=None,
                      signed='auto',
                      init_range=6.0,
                      per_channel=False,
                      requant_points=False):
    """Build ``backbone`` with fixed-bit quantized convs.

    Give either ``policy`` (a policy JSON path or dict, keyed by module name)
    or uniform ``w_bits`` and ``a_bits``.

    Args:
        backbone (dict | nn.Module): An mmpretrain backbone config.
        policy (str | dict, optional): Per-layer bits; it must name exactly
            the layers this backbone quantizes (by default every conv but
            the stem), else a ``ValueError`` names the file and the layers.
        w_bits / a_bits (int, optional): Uniform bits instead of a policy.
        include / exclude, signed, init_range, per_channel: As for
            :func:`MixedPrecisionBackbone`.
        requant_points (bool): Put the roundings of an integer runtime
            into the network: 8-bit points on the residual stream and, in
            eval, the int32 bias (ResNet and MobileNetV2 blocks; see
            :mod:`gmpq_mm.models.utils.requant_blocks`), so that it trains
            and tests as its integer ONNX export computes.

    Returns:
        nn.Module: The backbone with ``QuantizedConv2d`` layers.
    """
    if (policy is None) == (w_bits is None and a_bits is None):
        raise ValueError('QuantizedBackbone needs either `policy` or uniform '
                         '`w_bits` and `a_bits`, not both / neither')
    model, names = build_and_select(backbone, include, exclude)
    if policy is None:
        if w_bits is None or a_bits is None:
            raise ValueError('QuantizedBackbone: uniform bits need both '
                             f'w_bits and a_bits, got {w_bits}, {a_bits}')
        bits = {
            name: (check_bits(w_bits, 'QuantizedBackbone w_bits'),
                   check_bits(a_bits, 'QuantizedBackbone a_bits'))
            for name in names
        }
    else:
        bits = validate_policy(
            policy, names, w_allowed=SUPPORTED_BITS, a_allowed=SUPPORTED_BITS)
    model = to_quantized(
        model,
        bits,
        names=names,
        signed=signed,
        input_shape=(stem_in_channels(model), 64, 64),
        init_range=init_range,
        per_channel=per_channel)
    if not isinstance(requant_points, bool):
        raise ValueError('QuantizedBackbone: requant_points must be True or '
                         f'False, got {requant_points!r}')
    if requant_points:
        add_requant_points(
            model, where=f'QuantizedBackbone({type(model).__name__})')
    return model
