from .config_checks import check_paths, find_missing_paths
from .setup_env import register_all_modules

__all__ = ['check_paths', 'find_missing_paths', 'register_all_modules']
