from .hooks import *  # noqa: F401,F403
from .loops import *  # noqa: F401,F403
from .model_wrappers import *  # noqa: F401,F403
from .optimizers import SearchOptimWrapperConstructor  # noqa: F401
