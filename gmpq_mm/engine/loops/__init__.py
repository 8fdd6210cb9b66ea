from .search_loop import (SearchLoop, arch_step, bilevel_step,
                          single_level_step, split_dataset, weights_step)

__all__ = [
    'SearchLoop', 'arch_step', 'bilevel_step', 'single_level_step',
    'split_dataset', 'weights_step'
]
