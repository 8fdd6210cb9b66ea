from .search_loop import (SearchLoop, bilevel_step, single_level_step,
                          split_dataset)

__all__ = [
    'SearchLoop', 'bilevel_step', 'single_level_step', 'split_dataset'
]
