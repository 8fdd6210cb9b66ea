"""What each floor of the package imports, checked in fresh interpreters.

* ``gmpq_mm`` and ``gmpq_mm.utils``: no torch, no OpenMMLab (tools import
  them before parsing their arguments).
* ``gmpq_mm.quantization.*``, ``gmpq_mm.deploy.*``,
  ``gmpq_mm.visualization.*`` and every module
  of ``gmpq_mm.utils``: torch, but no mmengine / mmpretrain / mmcv, and
  nothing above them in the package (:mod:`gmpq_mm.compat`, beside the
  floors, is allowed); and they import whatever the OpenMMLab versions
  (the version check belongs to :func:`register_all_modules`).
* ``gmpq_mm.models`` / ``engine`` / ``datasets`` / ``apis``: OpenMMLab, but
  importing them patches nothing; :func:`register_all_modules` does, once.
* ``gmpq_mm.study`` (floor 2: it builds configs and runs them) keeps its
  presets, plan and report maths light (no torch, no OpenMMLab); no tool
  edits ``sys.path`` or imports another tool.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPENMMLAB = ('mmengine', 'mmpretrain', 'mmcv')
# gmpq_mm.compat sits beside the floors (torch and numpy only at its top,
# OpenMMLab inside its functions), so floor 1 may import it; the OpenMMLab
# check below covers it too.
UPPER_FLOORS = ('gmpq_mm.models', 'gmpq_mm.engine', 'gmpq_mm.datasets',
                'gmpq_mm.apis', 'gmpq_mm.registry', 'gmpq_mm.study')


def modules_of(package):
    folder = ROOT.joinpath(*package.split('.'))
    return sorted(f'{package}.{p.stem}' for p in folder.glob('*.py')
                  if p.stem != '__init__')


def imported_after(code):
    """``sys.modules`` keys of a fresh interpreter after running ``code``."""
    script = (
        code + '\nimport json, sys\n'
        'print(json.dumps(sorted(sys.modules)))')
    out = subprocess.run([sys.executable, '-c', script],
                         cwd=str(ROOT),
                         capture_output=True,
                         text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def roots(modules):
    return {m.split('.')[0] for m in modules}


def test_modules_found():
    # The globs below must see the real modules, or the checks prove nothing.
    assert 'gmpq_mm.quantization.quantizers' in modules_of(
        'gmpq_mm.quantization')
    assert 'gmpq_mm.deploy.onnx_integer' in modules_of('gmpq_mm.deploy')
    assert 'gmpq_mm.visualization.policy_plot' in modules_of(
        'gmpq_mm.visualization')
    # The sensitivity numerics and picture are floor 1 too.
    assert {
        'gmpq_mm.quantization.sensitivity', 'gmpq_mm.quantization.hessian'
    } <= set(modules_of('gmpq_mm.quantization'))
    assert 'gmpq_mm.visualization.sensitivity_plot' in modules_of(
        'gmpq_mm.visualization')


def test_package_and_utils_import_no_torch():
    loaded = imported_after('import gmpq_mm, gmpq_mm.utils\n'
                            'from gmpq_mm.utils import register_all_modules')
    assert not roots(loaded) & {'torch', *OPENMMLAB}, sorted(
        roots(loaded) & {'torch', *OPENMMLAB})


FLOOR_ONE = [
    'gmpq_mm.quantization', 'gmpq_mm.deploy', 'gmpq_mm.visualization',
    'gmpq_mm.utils'
]


@pytest.mark.parametrize('package', FLOOR_ONE)
def test_pure_floors_import_no_openmmlab(package):
    # One interpreter imports every module of the floor: if the union pulls
    # in no OpenMMLab package, no single module does.
    code = '\n'.join(f'import {m}' for m in [package] + modules_of(package))
    loaded = imported_after(code)
    assert 'torch' in loaded  # the check ran past the imports
    assert not roots(loaded) & set(OPENMMLAB), sorted(
        m for m in loaded if m.split('.')[0] in OPENMMLAB)[:10]
    upper = [m for m in loaded if m.startswith(UPPER_FLOORS)]
    assert not upper, upper


def test_floor_one_imports_whatever_the_stack():
    """An OpenMMLab release out of range stops the integration layer
    (``register_all_modules``, in one line) but not the numerics."""
    modules = [m for p in FLOOR_ONE for m in [p] + modules_of(p)]
    code = ('from gmpq_mm import compat\n'
            "compat.SUPPORTED['mmengine'] = ('99.0', '100.0')\n" +
            '\n'.join(f'import {m}' for m in modules) + '\n'
            'from gmpq_mm.utils import register_all_modules\n'
            'try:\n    register_all_modules()\n'
            'except compat.UnsupportedStackError as err:\n'
            "    print('REFUSED', err)\n")
    out = subprocess.run([sys.executable, '-c', code],
                         cwd=str(ROOT),
                         capture_output=True,
                         text=True,
                         timeout=300,
                         env={
                             k: v
                             for k, v in os.environ.items()
                             if k != 'GMPQ_MM_SKIP_VERSION_CHECK'
                         })
    assert out.returncode == 0, out.stderr[-3000:]
    refused = [x for x in out.stdout.splitlines() if x.startswith('REFUSED')]
    assert len(refused) == 1 and 'mmengine' in refused[0] and \
        'supported: >=99.0,<100.0' in refused[0], out.stdout[-2000:]


def test_import_patches_nothing_register_all_modules_does():
    code = '''
import gmpq_mm.apis, gmpq_mm.datasets, gmpq_mm.engine, gmpq_mm.models
from mmengine.runner.checkpoint import CheckpointLoader
from gmpq_mm.engine import checkpoint_load
from gmpq_mm.utils import register_all_modules
from mmpretrain.registry import MODELS
before = CheckpointLoader._schemes[''] is checkpoint_load._load_local
register_all_modules()
register_all_modules()  # idempotent
after = CheckpointLoader._schemes[''] is checkpoint_load._load_local
http = CheckpointLoader._schemes['https://'] is checkpoint_load._load_http
built = MODELS.get('GMPQSearchClassifier') is not None
print('RESULT', before, after, http, built)
'''
    out = subprocess.run([sys.executable, '-c', code],
                         cwd=str(ROOT),
                         capture_output=True,
                         text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith('RESULT')][0]
    assert line.split()[1:] == ['False', 'True', 'True', 'True']


def test_register_all_module_for_custom_imports():
    """``custom_imports=dict(imports=['gmpq_mm.register_all'])`` patches the
    loaders and registers the types."""
    code = '''
from mmengine.utils import import_modules_from_strings
import_modules_from_strings(['gmpq_mm.register_all'])
from mmengine.runner.checkpoint import CheckpointLoader
from mmpretrain.registry import HOOKS, LOOPS
from gmpq_mm.engine import checkpoint_load
print('RESULT', CheckpointLoader._schemes[''] is checkpoint_load._load_local,
      LOOPS.get('SearchLoop') is not None,
      HOOKS.get('CalibrationHook') is not None)
'''
    out = subprocess.run([sys.executable, '-c', code],
                         cwd=str(ROOT),
                         capture_output=True,
                         text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith('RESULT')][0]
    assert line.split()[1:] == ['True', 'True', 'True']


def module_level_imports(package):
    """``{module: {module it imports at its top}}`` of ``package``'s own
    modules, read from the source (imports inside functions are lazy and
    cannot close a circle at import time)."""
    import ast
    own = set(modules_of(package))
    graph = {}
    for name in own:
        path = ROOT.joinpath(*name.split('.')).with_suffix('.py')
        targets = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit('.', node.level - 1)[0]
                    mod = f'{base}.{node.module}' if node.module else base
                else:
                    mod = node.module
                targets.add(mod)
                targets.update(f'{mod}.{a.name}' for a in node.names)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        graph[name] = targets & own
    return graph


def find_cycle(graph):
    """One import circle of ``graph`` as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = 'open'
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 'open':
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 'done'
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_find_cycle_sees_a_circle():
    # The checker itself: a made-up circle is found, a chain is not.
    assert find_cycle({
        'a': {'b'},
        'b': {'c'},
        'c': {'a'}
    }) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None


@pytest.mark.parametrize('package', FLOOR_ONE)
def test_no_import_circles(package):
    graph = module_level_imports(package)
    # The graph is read: quantizers sits on top of the kernel modules.
    if package == 'gmpq_mm.quantization':
        assert 'gmpq_mm.quantization.autograd_functions' in graph[
            'gmpq_mm.quantization.quantizers']
        assert 'gmpq_mm.quantization.bits' in graph[
            'gmpq_mm.quantization.policy']
    assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


# The study's modules that read or decide but run nothing: a tool lists the
# presets and a test checks the report maths without torch or OpenMMLab.
STUDY_LIGHT = ('gmpq_mm.study', 'gmpq_mm.study.presets', 'gmpq_mm.study.plan',
               'gmpq_mm.study.stats', 'gmpq_mm.study.verdict',
               'gmpq_mm.study.report')


def test_study_light_modules_import_no_torch():
    assert set(STUDY_LIGHT[1:]) < set(modules_of('gmpq_mm.study'))
    loaded = imported_after('\n'.join(f'import {m}' for m in STUDY_LIGHT))
    assert 'gmpq_mm.study.report' in loaded  # the check ran past the imports
    assert not roots(loaded) & {'torch', *OPENMMLAB}, sorted(
        roots(loaded) & {'torch', *OPENMMLAB})


def test_study_has_no_import_circles():
    graph = module_level_imports('gmpq_mm.study')
    assert 'gmpq_mm.study.plan' in graph['gmpq_mm.study.runner']
    assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_tools_neither_edit_sys_path_nor_import_each_other():
    """A tool is a command line over the package: it reaches shared code
    through ``gmpq_mm``, never through another script's folder."""
    import ast
    tools = sorted((ROOT / 'tools').rglob('*.py'))
    names = {p.stem for p in tools}
    assert 'policy_study' in names and 'search_diagnostics' in names
    bad = []
    for path in tools:
        text = path.read_text()
        if 'sys.path' in text:
            bad.append(f'{path.relative_to(ROOT)} edits sys.path')
        for node in ast.walk(ast.parse(text)):
            mods = [a.name for a in node.names] if isinstance(
                node, ast.Import) else [node.module or ''] if isinstance(
                    node, ast.ImportFrom) else []
            bad += [
                f'{path.relative_to(ROOT)} imports the tool {m}' for m in mods
                if m.split('.')[0] in names
            ]
    assert not bad, bad
