"""Make gmpq_mm usable from configs: the one explicit set-up call."""
_done = False


def register_all_modules(init_default_scope: bool = False) -> None:
    """Register every gmpq_mm type and patch mmengine's checkpoint loading.

    Imports :mod:`gmpq_mm.datasets`, :mod:`gmpq_mm.engine` and
    :mod:`gmpq_mm.models` (their classes register themselves into
    mmpretrain's registries, see :mod:`gmpq_mm.registry`), registers
    mmpretrain's own types, refuses an unsupported stack (importing
    :mod:`gmpq_mm.compat` does) and applies the compatibility
    patches (:func:`gmpq_mm.compat.apply_compat_patches`: mmengine's local
    and http checkpoint loading through
    :func:`gmpq_mm.compat.load_trusted_checkpoint`, and the shims for newer
    setuptools and numpy).
    Calling it again does nothing more. This is mmpretrain's
    ``register_all_modules`` pattern: importing a gmpq_mm module never has
    these effects by itself.

    Args:
        init_default_scope (bool): Also make ``'mmpretrain'`` the default
            registry scope (what a config's ``default_scope`` does for a
            Runner), for building types outside a Runner.
    """
    global _done
    # Imported here: these imports are the registration (and cost seconds).
    # Importing compat checks the stack's versions (one-line ImportError).
    from gmpq_mm.compat import apply_compat_patches
    if not _done:
        # Before mmpretrain is imported: the setuptools/numpy shims must be
        # in place when it and mmengine look packages up.
        apply_compat_patches()
    from mmpretrain.utils import register_all_modules as register_mmpretrain

    register_mmpretrain(init_default_scope=init_default_scope)
    if _done:
        return
    import gmpq_mm.datasets  # noqa: F401
    import gmpq_mm.engine  # noqa: F401
    import gmpq_mm.models  # noqa: F401

    _done = True
