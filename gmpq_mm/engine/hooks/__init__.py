from .policy_export_hook import PolicyExportHook, format_policy

__all__ = ['PolicyExportHook', 'format_policy']
