from .config_checks import check_paths, find_missing_paths

__all__ = ['check_paths', 'find_missing_paths']
