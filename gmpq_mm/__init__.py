"""gmpq_mm: GMPQ mixed-precision search as an OpenMMLab plugin.

``custom_imports=dict(imports=['gmpq_mm'])`` in a config registers every
gmpq_mm type into mmpretrain's registries (see :mod:`gmpq_mm.registry`).
"""
from .compat import apply_compat_patches, check_versions
from .version import __version__

check_versions()
apply_compat_patches()

from . import datasets, engine, models  # noqa: E402,F401  (register types)

__all__ = ['__version__']
