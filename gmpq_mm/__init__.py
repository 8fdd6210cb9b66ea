"""gmpq_mm: GMPQ mixed-precision search as an OpenMMLab plugin.

Importing ``gmpq_mm`` (or :mod:`gmpq_mm.quantization`, the pure-PyTorch
numerics) imports neither mmengine nor mmpretrain and changes nothing.
To use the OpenMMLab side -- the registered types and the checkpoint loading
of :mod:`gmpq_mm.compat` -- call :func:`gmpq_mm.utils.register_all_modules`
once; configs do that with
``custom_imports=dict(imports=['gmpq_mm.register_all'])`` and the tools call
it themselves.
"""
from .version import __version__

__all__ = ['__version__']
