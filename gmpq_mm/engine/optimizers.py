"""Two optimizers for the GMPQ search: network weights and the alphas."""
from mmengine.optim import OptimWrapperDict

from gmpq_mm.registry import (OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS,
                              OPTIMIZERS)

SEARCH_OPTIMIZERS = ('weights', 'arch')


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class SearchOptimWrapperConstructor:
    """Build ``OptimWrapperDict(weights=..., arch=...)`` for a search model.

    ``weights`` gets every trainable parameter but the alphas (network
    weights and quantizer ranges); ``arch`` gets the alphas only; the frozen
    teacher is in neither. Config::

        optim_wrapper = dict(
            constructor='SearchOptimWrapperConstructor',
            weights=dict(optimizer=dict(type='SGD', lr=0.1, ...)),
            arch=dict(optimizer=dict(type='SGD', lr=0.01, ...)))

    Each entry is an ordinary optim-wrapper config (``type`` defaults to
    ``OptimWrapper``; ``AmpOptimWrapper``, ``clip_grad`` ... work).
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg=None):
        if paramwise_cfg:
            raise ValueError('SearchOptimWrapperConstructor: paramwise_cfg '
                             'is not supported')
        missing = [k for k in SEARCH_OPTIMIZERS if k not in optim_wrapper_cfg]
        extra = [k for k in optim_wrapper_cfg if k not in SEARCH_OPTIMIZERS]
        if missing or extra:
            raise ValueError(
                'SearchOptimWrapperConstructor needs exactly the keys '
                f'{list(SEARCH_OPTIMIZERS)} in optim_wrapper; missing '
                f'{missing}, unexpected {extra}')
        self.cfgs = {k: dict(optim_wrapper_cfg[k]) for k in SEARCH_OPTIMIZERS}

    def __call__(self, model) -> OptimWrapperDict:
        module = getattr(model, 'module', model)
        if not hasattr(module, 'arch_parameters'):
            raise TypeError(f'{type(module).__name__} has no '
                            'arch_parameters(): the search needs a '
                            'GMPQSearchClassifier')
        params = dict(
            weights=module.weight_parameters(), arch=module.arch_parameters())
        wrappers = {}
        for key in SEARCH_OPTIMIZERS:
            cfg = dict(self.cfgs[key])
            cfg.setdefault('type', 'OptimWrapper')
            optimizer_cfg = dict(cfg.pop('optimizer'))
            optimizer_cfg['params'] = params[key]
            cfg['optimizer'] = OPTIMIZERS.build(optimizer_cfg)
            wrappers[key] = OPTIM_WRAPPERS.build(cfg)
        return OptimWrapperDict(**wrappers)
