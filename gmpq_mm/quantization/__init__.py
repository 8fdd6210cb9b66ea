"""Floor 1: GMPQ's quantization numerics in plain PyTorch.

Nothing here imports mmengine or mmpretrain: use it on any ``nn.Module``.
Layers are named as ``model.named_modules()`` names them, so a policy
found on one network applies to any network with the same names.

Example:
    >>> from torch import nn
    >>> from gmpq_mm.quantization import (Policy, complexity_report,
    ...                                   to_quantized)
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    >>> policy = Policy.from_layers({'2': (4, 3)})
    >>> net = to_quantized(net, policy)
    >>> complexity_report(net, (3, 8, 8))['totals']['bitops_quantized']
    110592
"""
from .budget import (best_policy_under_budget, bitops_constraint,
                     log_probs_from_model, policy_cost, policy_size_mb,
                     size_constraint)
from .calibration import calibrate_model
from .complexity import (LayerMacs, bitops, complexity_report, count_macs,
                         expected_bitops, format_table)
from .convert import (detect_signed_inputs, policy_from_model, select_layers,
                      to_mixed_precision, to_quantized)
from .export import ArtifactError, load_artifact, save_artifact
from .layers import (MixedPrecisionConv2d, MixedPrecisionLinear,
                     QuantizedConv2d, QuantizedLinear, is_mixed_layer,
                     is_quantized_layer)
from .policy import (Policy, load_policy, make_policy, policy_layers,
                     save_policy, validate_policy)
from .probe import eval_mode
from .quantizers import SUPPORTED_BITS, quantize_activation, quantize_weight
from .solver import BudgetError, Constraint, solve_policy
from .targets import (TARGETS, TargetError, check_policy_target,
                      emulated_layers, get_target)

__all__ = [
    # Convert a model: a searchable supernet, or fixed bits from a policy.
    'select_layers',
    'to_mixed_precision',
    'to_quantized',
    'detect_signed_inputs',
    'policy_from_model',
    # Policies: the JSON file, loaded, checked and saved.
    'Policy',
    'make_policy',
    'load_policy',
    'save_policy',
    'validate_policy',
    'policy_layers',
    # Count: MACs, BitOPs, size, compression.
    'count_macs',
    'bitops',
    'expected_bitops',
    'complexity_report',
    'format_table',
    'LayerMacs',
    # Budget: the most likely policy within a BitOPs budget.
    'best_policy_under_budget',
    'log_probs_from_model',
    'policy_cost',
    # Any scores under any linear budgets (exact): BitOPs, model size.
    'solve_policy',
    'Constraint',
    'bitops_constraint',
    'size_constraint',
    'policy_size_mb',
    'BudgetError',
    # Deployment targets: native, emulated and refused bit widths.
    'TARGETS',
    'get_target',
    'emulated_layers',
    'check_policy_target',
    'TargetError',
    # Calibrate and export a fixed-bit network.
    'calibrate_model',
    'save_artifact',
    'load_artifact',
    'ArtifactError',
    # The building blocks.
    'MixedPrecisionConv2d',
    'MixedPrecisionLinear',
    'QuantizedConv2d',
    'QuantizedLinear',
    'is_mixed_layer',
    'is_quantized_layer',
    'quantize_weight',
    'quantize_activation',
    'SUPPORTED_BITS',
    'eval_mode',
]
