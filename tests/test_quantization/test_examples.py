"""The ``Example:`` of every public entry point runs and shows what it says.

The public API is ``gmpq_mm.quantization.__all__``; the entry points below
(converting, policies, counting, budget, calibration, export) must each
carry an example, and every example in the floor's modules must pass.
"""
import doctest
import importlib
import pkgutil

import pytest

import gmpq_mm.quantization as quantization
import gmpq_mm.utils.cli
import gmpq_mm.utils.model

ENTRY_POINTS = ('select_layers', 'to_mixed_precision', 'to_quantized',
                'policy_from_model', 'Policy', 'make_policy', 'load_policy',
                'validate_policy', 'count_macs', 'bitops', 'complexity_report',
                'best_policy_under_budget', 'calibrate_model', 'save_artifact',
                'eval_mode')
MODULES = [quantization] + [
    importlib.import_module(f'gmpq_mm.quantization.{info.name}')
    for info in pkgutil.iter_modules(quantization.__path__)
] + [gmpq_mm.utils.cli, gmpq_mm.utils.model]


def test_public_names_exist():
    missing = [n for n in quantization.__all__ if not hasattr(quantization, n)]
    assert not missing, missing
    assert len(set(quantization.__all__)) == len(quantization.__all__)


@pytest.mark.parametrize('name', ENTRY_POINTS)
def test_entry_point_has_an_example(name):
    assert name in quantization.__all__
    doc = getattr(quantization, name).__doc__ or ''
    assert 'Example:' in doc and '>>> ' in doc, name


@pytest.mark.parametrize('module', MODULES, ids=lambda m: m.__name__)
def test_examples_pass(module):
    result = doctest.testmod(
        module,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        verbose=False,
        report=True)
    assert result.failed == 0, f'{result.failed} example(s) failed'
