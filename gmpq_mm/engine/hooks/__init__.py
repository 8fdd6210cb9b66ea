from .bit_width_record_hook import BitWidthRecordHook
from .calibration_hook import CalibrationHook
from .policy_export_hook import PolicyExportHook, format_policy
from .quant_kernel_hook import QuantKernelHook

__all__ = [
    'BitWidthRecordHook', 'CalibrationHook', 'PolicyExportHook',
    'format_policy', 'QuantKernelHook'
]
