"""Make gmpq_mm usable from configs: the one explicit set-up call."""
_done = False


def register_all_modules(init_default_scope: bool = False) -> None:
    """Check the stack, patch mmengine and register every gmpq_mm type.

    In this order: refuses an unsupported stack
    (:func:`gmpq_mm.compat.check_versions`, one-line
    :class:`gmpq_mm.compat.UnsupportedStackError`), applies the version
    shims (:func:`gmpq_mm.compat.apply_compat_patches`), registers
    mmpretrain's types, imports :mod:`gmpq_mm.datasets`,
    :mod:`gmpq_mm.engine` and :mod:`gmpq_mm.models` (their classes register
    themselves into mmpretrain's registries, see :mod:`gmpq_mm.registry`)
    and routes mmengine's checkpoint reading and writing through
    :mod:`gmpq_mm.engine.checkpoint_load` (nothing in a file runs unless
    trusted) and :mod:`gmpq_mm.engine.checkpoint_save` (atomic writes).
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
    from gmpq_mm.compat import apply_compat_patches, check_versions
    if not _done:
        check_versions()
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
    from gmpq_mm.engine.checkpoint_load import patch_checkpoint_loading
    from gmpq_mm.engine.checkpoint_save import patch_checkpoint_saving
    patch_checkpoint_loading()
    patch_checkpoint_saving()

    _done = True
