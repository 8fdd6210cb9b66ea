"""Importing this module registers gmpq_mm: the module configs name in
``custom_imports=dict(imports=['gmpq_mm.register_all'])``.

It only calls :func:`gmpq_mm.utils.register_all_modules` (idempotent).
"""
from gmpq_mm.utils.setup_env import register_all_modules

register_all_modules()
