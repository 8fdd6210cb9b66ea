from .model_wrappers import *  # noqa: F401,F403
