from .calibration_hook import CalibrationHook
from .policy_export_hook import PolicyExportHook, format_policy

__all__ = ['CalibrationHook', 'PolicyExportHook', 'format_policy']
