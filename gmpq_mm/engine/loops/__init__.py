from .search_loop import SearchLoop, split_dataset

__all__ = ['SearchLoop', 'split_dataset']
