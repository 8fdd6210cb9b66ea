from .bit_width_record_hook import BitWidthRecordHook
from .calibration_hook import CalibrationHook
from .exact_resume_hook import ExactResumeHook, add_exact_resume
from .policy_export_hook import PolicyExportHook, format_policy
from .quant_kernel_hook import QuantKernelHook

__all__ = [
    'BitWidthRecordHook', 'CalibrationHook', 'ExactResumeHook',
    'add_exact_resume', 'PolicyExportHook', 'format_policy', 'QuantKernelHook'
]
