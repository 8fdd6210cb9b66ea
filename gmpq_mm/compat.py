"""Everything that differs across the supported stack, and nothing else.

gmpq_mm runs on torch 2.1 ... 2.15, numpy 1.26 ... 2.4, mmengine 0.10.x,
mmcv(-lite) 2.1 ... 2.2 and mmpretrain 1.2 (the ranges CI tests, see
:data:`SUPPORTED`). Each shim here says which versions need it, so it can
be dropped when the oldest supported release no longer does:

* :func:`check_versions` -- refuse an untested torch/numpy/mmcv/... in one
  line that names the supported range. It is *not* run on import: the
  numerics (:mod:`gmpq_mm.quantization`, :mod:`gmpq_mm.utils`,
  :mod:`gmpq_mm.visualization`) import whatever the stack; the integration
  layer runs it (:func:`gmpq_mm.utils.register_all_modules`, so every tool
  and config);
* :func:`load_weights_only` -- torch's safe (``weights_only``) loader with
  an allow-list, which only torch >= 2.6 can give mmengine's checkpoint
  types (see :data:`SAFE_GLOBALS_USABLE`);
* :func:`numpy_multiarray` -- numpy's ``multiarray`` module, which numpy 2
  moved to ``numpy._core`` (the checkpoint allow-list names both);
* :func:`is_autocast_enabled` -- the per-device autocast query (torch 2.4
  added the ``device_type`` argument; before, CPU had its own function);
* :func:`enable_compile_cache` -- inductor's on-disk graph cache (off by
  default in torch 2.2 / 2.3);
* :func:`patch_mmengine_package_lookup` -- mmengine 0.10 finds
  ``mmpretrain::`` config bases through ``pkg_resources``, which
  setuptools 81+ no longer ships; replaced by :mod:`importlib.metadata`;
* :func:`patch_numpy_removed_apis` -- numpy 2.4 removed ``np.in1d``,
  which mmpretrain 1.2's retrieval metrics still call;
* :func:`export_onnx` -- the TorchScript ONNX exporter, which stopped being
  the default in torch 2.9.

:func:`apply_compat_patches` applies the two patches;
:func:`gmpq_mm.utils.register_all_modules` calls it. This module imports
only torch and numpy at the top (OpenMMLab inside functions), so the
numerics floor may use it. Checkpoint trust lives in
:mod:`gmpq_mm.engine.checkpoint_load`, atomic checkpoint writes in
:mod:`gmpq_mm.engine.checkpoint_save`, gloo launching in
:mod:`gmpq_mm.engine.launch`.
"""
import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import os
import os.path as osp
import re
import sys
import types

import numpy as np
import torch

# (lowest, first unsupported) release of every package CI tests the ends of;
# requirements/*.txt state the same bounds (tests/test_compat.py checks).
SUPPORTED = {
    'torch': ('2.1', '2.16'),
    'torchvision': ('0.16', '0.30'),
    'numpy': ('1.26', '2.5'),
    'mmcv': ('2.1.0', '2.3'),
    'mmengine': ('0.10.3', '0.11'),
    'mmpretrain': ('1.2.0', '1.3'),
}
# Distributions that provide each module (mmcv comes full or lite).
_DISTRIBUTIONS = {'mmcv': ('mmcv', 'mmcv-lite', 'mmcv-full')}
SKIP_CHECK_ENV = 'GMPQ_MM_SKIP_VERSION_CHECK'


def version_tuple(version: str) -> tuple:
    """``'2.1.2+cu121'`` -> ``(2, 1, 2)``; pre-releases count as released."""
    parts = []
    for piece in version.split('+')[0].split('.'):
        match = re.match(r'\d+', piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    return tuple(parts)


def _installed_version(module: str):
    """Version of ``module``'s distribution, without importing it."""
    if module == 'torch':
        return torch.__version__
    if module == 'numpy':
        return np.__version__
    for dist in _DISTRIBUTIONS.get(module, (module, )):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def unsupported_versions() -> list:
    """``'torch 2.0.1 (supported: >=2.1,<2.16)'`` for every package out of
    :data:`SUPPORTED` (missing ones are for pip / the import to report)."""
    problems = []
    for module, (low, high) in SUPPORTED.items():
        found = _installed_version(module)
        if found is None:
            continue
        v = version_tuple(found)
        if not version_tuple(low) <= v < version_tuple(high):
            problems.append(f'{module} {found} (supported: >={low},<{high})')
    # torch wheels before 2.3 are built against numpy 1.x and break on 2.x.
    torch_v, numpy_v = _installed_version('torch'), _installed_version('numpy')
    if version_tuple(torch_v) < (2, 3) and version_tuple(numpy_v) >= (2, ):
        problems.append(f'numpy {numpy_v} with torch {torch_v} (torch<2.3 '
                        'needs numpy<2)')
    return problems


class UnsupportedStackError(ImportError):
    """An installed package is outside :data:`SUPPORTED` (one-line
    message; tools print it without a traceback)."""


def check_versions() -> None:
    """Raise :class:`UnsupportedStackError` in one line if a package is out
    of range.

    ``GMPQ_MM_SKIP_VERSION_CHECK`` set to an on word (1 / true / yes / on,
    :func:`gmpq_mm.utils.env_flags.env_flag`) turns the check off, at your
    own risk: nothing outside the ranges is tested.
    """
    from gmpq_mm.utils.env_flags import env_flag
    if env_flag(SKIP_CHECK_ENV):
        return
    problems = unsupported_versions()
    if problems:
        raise UnsupportedStackError(
            'gmpq_mm does not support ' + '; '.join(problems) +
            ' -- install a supported release (README: Install) or set '
            f'{SKIP_CHECK_ENV}=1 to try anyway')


TORCH_VERSION = version_tuple(torch.__version__)
# torch 2.6: weights_only=True by default and (object, 'module.name')
# entries in safe_globals, the only way to allow a restricted getattr --
# which mmengine's checkpoints need (its MessageHub pickles
# ``getattr(HistoryBuffer, 'min')``).
SAFE_GLOBALS_USABLE = TORCH_VERSION >= (2, 6)


def load_weights_only(filename, map_location=None, allowed=()):
    """``torch.load(weights_only=True)`` with ``allowed`` globals.

    torch >= 2.6 takes ``allowed`` (objects and ``(object, 'module.name')``
    pairs) for this one load; older torch cannot restrict ``getattr``, so
    there only tensor-only files load and ``allowed`` is ignored. Raises
    :class:`pickle.UnpicklingError` for anything else in the file (nothing
    in it is run).
    """
    if SAFE_GLOBALS_USABLE and allowed:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(
                filename, map_location=map_location, weights_only=True)
    return torch.load(filename, map_location=map_location, weights_only=True)


def numpy_multiarray():
    """numpy's ``multiarray`` module: ``numpy._core.multiarray`` from numpy 2
    on, ``numpy.core.multiarray`` before (numpy 1.26 has a ``numpy._core``
    stub whose ``multiarray`` attribute exists only once imported)."""
    try:
        return importlib.import_module('numpy._core.multiarray')
    except ImportError:
        return importlib.import_module('numpy.core.multiarray')


def is_autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``'cpu'``/``'cuda'``)."""
    if TORCH_VERSION >= (2, 4):
        return torch.is_autocast_enabled(device_type)
    if device_type == 'cpu':
        return torch.is_autocast_cpu_enabled()
    return torch.is_autocast_enabled()  # CUDA only before torch 2.4


def enable_compile_cache() -> None:
    """Let ``torch.compile`` keep compiled graphs on disk across processes.

    torch >= 2.4 does by default (inductor's FX graph cache, under
    ``TORCHINDUCTOR_CACHE_DIR``, else the temp dir); 2.2 and 2.3 have the
    cache but off by default; 2.1 has none (each process compiles). An
    explicit ``TORCHINDUCTOR_FX_GRAPH_CACHE`` is left alone.
    """
    if 'TORCHINDUCTOR_FX_GRAPH_CACHE' in os.environ:
        return
    try:
        import torch._inductor.config as inductor_config
    except Exception:  # noqa: BLE001 - no inductor: compiling will fail
        return
    if getattr(inductor_config, 'fx_graph_cache', None) is False:
        inductor_config.fx_graph_cache = True


# ---------------------------------------------------------------------------
# mmengine without pkg_resources (setuptools >= 81)
# ---------------------------------------------------------------------------
def _is_installed(package: str) -> bool:
    """mmengine's ``is_installed``, on :mod:`importlib.metadata`."""
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        spec = importlib.util.find_spec(package)
        return spec is not None and spec.origin is not None


def _package2module(package: str) -> str:
    """mmengine's ``package2module``: the distribution's top-level module."""
    top_level = importlib.metadata.distribution(package).read_text(
        'top_level.txt')
    if top_level:
        return top_level.split('\n')[0]
    raise ValueError(f'can not infer the module name of {package}')


def _get_installed_path(package: str) -> str:
    """mmengine's ``get_installed_path``, on :mod:`importlib.metadata`."""
    try:
        location = str(
            importlib.metadata.distribution(package).locate_file(''))
    except importlib.metadata.PackageNotFoundError:
        spec = importlib.util.find_spec(package)
        if spec is None:
            raise
        if spec.origin is None:
            raise RuntimeError(f'{package} is a namespace package, which is '
                               'invalid for `get_install_path`')
        return osp.dirname(spec.origin)
    possible_path = osp.join(location, package)
    if osp.exists(possible_path):
        return possible_path
    return osp.join(location, _package2module(package))


def patch_mmengine_package_lookup() -> bool:
    """Give mmengine's package look-ups an :mod:`importlib.metadata` base
    where ``pkg_resources`` is gone (setuptools >= 81 or none installed).

    mmengine 0.10 imports ``pkg_resources`` inside ``is_installed`` and
    ``get_installed_path``, which ``Config.fromfile`` calls for every
    ``mmpretrain::`` base. The functions are replaced in the modules that
    imported them by name. Returns whether anything was patched.
    """
    if importlib.util.find_spec('pkg_resources') is not None:
        return False
    import mmengine.config.config as config_module
    import mmengine.utils as utils
    import mmengine.utils.package_utils as package_utils
    replacements = dict(
        is_installed=_is_installed,
        get_installed_path=_get_installed_path,
        package2module=_package2module)
    for module in (package_utils, utils, config_module):
        for name, fn in replacements.items():
            if hasattr(module, name):
                setattr(module, name, fn)
    hub = sys.modules.get('mmengine.hub.hub')
    if hub is not None:
        hub.get_installed_path = _get_installed_path
    return True


# ---------------------------------------------------------------------------
# numpy >= 2.4 removed np.in1d (mmpretrain 1.2 retrieval metrics call it)
# ---------------------------------------------------------------------------
def _in1d(ar1, ar2, assume_unique=False, invert=False, **kwargs):
    """numpy's removed ``in1d``: ``isin`` of the flattened first array."""
    return np.isin(
        np.asarray(ar1).ravel(),
        ar2,
        assume_unique=assume_unique,
        invert=invert,
        **kwargs)


class _NumpyWithRemovedApis(types.ModuleType):
    """numpy as one module sees it: numpy plus the functions it removed."""

    in1d = staticmethod(_in1d)

    def __getattr__(self, name):
        return getattr(np, name)


# module -> numpy names it still calls that numpy has removed
_NUMPY_USERS = {'mmpretrain.evaluation.metrics.retrieval': ('in1d', )}


def _give_removed_numpy(module) -> None:
    if isinstance(getattr(module, 'np', None), _NumpyWithRemovedApis):
        return
    module.np = _NumpyWithRemovedApis('numpy')


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``patch(module)`` right after ``name`` is first imported."""

    def __init__(self, name, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, 'find_spec'):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module, patch = spec.loader.exec_module, self.patch

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def patch_numpy_removed_apis() -> list:
    """Hand the numpy functions a module still calls, where numpy removed
    them, to that module alone (numpy itself is left untouched): patched
    now if imported, else right after its import. Returns the modules."""
    patched = []
    for name, functions in _NUMPY_USERS.items():
        if all(hasattr(np, f) for f in functions):
            continue
        patched.append(name)
        if name in sys.modules:
            _give_removed_numpy(sys.modules[name])
        elif not any(
                isinstance(f, _AfterImport) and f.name == name
                for f in sys.meta_path):
            sys.meta_path.insert(0, _AfterImport(name, _give_removed_numpy))
    return patched


def apply_compat_patches() -> None:
    """The package look-up and numpy patches above;
    :func:`gmpq_mm.utils.register_all_modules` calls it once."""
    patch_mmengine_package_lookup()
    patch_numpy_removed_apis()


def export_onnx(module, args, path, **kwargs):
    """``torch.onnx.export`` with the TorchScript-based exporter pinned.

    torch < 2.9 uses the TorchScript exporter by default, torch >= 2.9 the
    ``torch.export``-based one (``dynamo=True``), which needs the extra
    ``onnxscript`` package and names and folds the graph differently. The
    gmpq QDQ export (:mod:`gmpq_mm.deploy.onnx_graph`) is written for the
    TorchScript exporter's output (Clip, QuantizeLinear, DequantizeLinear,
    Conv / Gemm, parameters as named initializers), so it is asked for
    explicitly; its DeprecationWarning in torch >= 2.9 is silenced here.
    """
    import inspect
    import warnings
    if 'dynamo' in inspect.signature(torch.onnx.export).parameters:
        kwargs['dynamo'] = False
    with warnings.catch_warnings():
        warnings.filterwarnings(
            'ignore', category=DeprecationWarning, module=r'torch\.onnx')
        warnings.filterwarnings(
            'ignore', message='.*legacy TorchScript-based ONNX export.*')
        torch.onnx.export(module, args, path, **kwargs)
