"""Registries gmpq_mm registers into.

gmpq_mm puts its types straight into mmpretrain's registries instead of
child registries with their own scope. Why: a child registry's types are
only found when the config's ``default_scope`` is the child's scope (or with a
``gmpq_mm.`` prefix on every type), whereas users keep
``default_scope = 'mmpretrain'`` and mix our types (``MixedPrecisionBackbone``,
``SearchLoop`` ...) with mmpretrain's (``ResNet``, ``CIFAR10`` ...) by bare
name. Registering into the parents gives exactly that; the price is one
namespace, so every gmpq_mm name is chosen not to clash (registration fails
loudly on a clash, ``force`` is never used).

Call :func:`gmpq_mm.utils.register_all_modules` (what
``custom_imports=dict(imports=['gmpq_mm.register_all'])`` does) to fill them.
"""
from mmpretrain.registry import (DATASETS, HOOKS, LOOPS, MODEL_WRAPPERS,
                                 MODELS, OPTIM_WRAPPER_CONSTRUCTORS,
                                 OPTIM_WRAPPERS, OPTIMIZERS, PARAM_SCHEDULERS,
                                 TRANSFORMS)

__all__ = [
    'DATASETS', 'HOOKS', 'LOOPS', 'MODELS', 'MODEL_WRAPPERS',
    'OPTIM_WRAPPER_CONSTRUCTORS', 'OPTIM_WRAPPERS', 'OPTIMIZERS',
    'PARAM_SCHEDULERS', 'TRANSFORMS'
]
