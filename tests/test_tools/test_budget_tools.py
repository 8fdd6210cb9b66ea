"""Size budgets and deployment targets through the tools: a search with
``model.target_size_mb`` run by tools/train.py, its policy counted by
tools/analysis/complexity.py and by hand; one-line errors for bad budgets
and for policies a target cannot hold, before anything is built."""
import importlib.util
import json

import pytest
import torch
from conftest import write_search_configs  # one conftest.py

from gmpq_mm.quantization.policy import make_policy, save_policy

TRAIN_LINES = 'tools/train.py'


def _train_main():
    spec = importlib.util.spec_from_file_location('gmpq_train_tool',
                                                  TRAIN_LINES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope='module')
def random_teacher(tmp_path_factory, repo_root):
    """A tiny teacher checkpoint with random weights (its shapes are all a
    search needs) and the config it fits."""
    from mmengine.config import Config

    from gmpq_mm.registry import MODELS
    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    folder = tmp_path_factory.mktemp('teacher')
    cfg = write_search_configs(folder, repo_root, folder, folder / 'none')
    model = MODELS.build(Config.fromfile(folder / 'teacher.py').model)
    path = folder / 'teacher.pth'
    torch.save({'state_dict': model.state_dict()}, path)
    del cfg
    return path


def test_size_budget_search_end_to_end(tmp_path, repo_root, cifar10_root,
                                       random_teacher, run_tool):
    cfg = write_search_configs(tmp_path, repo_root, cifar10_root,
                               random_teacher)
    work = tmp_path / 'w'
    # the tiny net: 0.051924 MB with every searched weight at 2 bits,
    # 0.139092 MB at 6 bits; ask for a size between, within 2 %
    budget = 0.08
    result = run_tool([
        'tools/train.py', cfg, '--work-dir', work, '--cfg-options',
        'train_cfg.max_epochs=1', f'model.target_size_mb={budget}',
        'model.target_size_mb_tolerance=0.02'
    ])
    policy = json.loads((work / 'policy.json').read_text())
    assert 0.98 * budget <= policy['size_mb'] <= budget
    assert policy['size_budget_mb'] == budget
    assert f'size {policy["size_mb"]:.4f} MB' in result.output  # the log
    out = tmp_path / 'c.json'
    run_tool([
        'tools/analysis/complexity.py', cfg, '--policy', work / 'policy.json',
        '--out', out, '--no-check'
    ])
    counted = json.loads(out.read_text())
    assert counted['size_mb'] == pytest.approx(policy['size_mb'], rel=1e-12)
    # by hand: the FP size, less the searched weights at 4 bytes, plus
    # those weights packed at their bits (whole bytes per layer)
    fp_bytes = round(counted['fp_size_mb'] * 1e6)
    packed = sum((n * policy['layers'][name]['w_bits'] + 7) // 8
                 for name, n in policy['layer_params'].items())
    by_hand = fp_bytes - 4 * sum(policy['layer_params'].values()) + packed
    assert policy['size_mb'] * 1e6 == pytest.approx(by_hand, abs=1e-6)


@pytest.mark.parametrize('option, shown', [
    ('model.target_bitops=abc', "got 'abc' (str)"),
    ('model.target_bitops=[1,2]', 'got [1, 2] (list)'),
    ('model.target_size_mb=True', 'got True (bool)'),
    ('model.target_size_mb_tolerance=0.5', 'needs model.target_size_mb'),
    ('model.target=tpu', "unknown target 'tpu'"),
])
def test_bad_budget_is_one_line_before_building(tmp_path, repo_root,
                                                cifar10_root, option, shown,
                                                capsys):
    # the teacher checkpoint does not need to load: nothing is built
    (tmp_path / 'teacher.pth').write_bytes(b'')
    cfg = write_search_configs(tmp_path, repo_root, cifar10_root,
                               tmp_path / 'teacher.pth')
    with pytest.raises(SystemExit) as err:
        _train_main()([
            str(cfg), '--work-dir',
            str(tmp_path / 'w'), '--cfg-options', option
        ])
    message = str(err.value.code)
    assert message.startswith('error: model.') and shown in message
    assert '\n' not in message
    assert not (tmp_path / 'w').exists()


def test_policy_a_target_cannot_hold_is_refused_before_training(tmp_path):
    layers = {'layer1.0.conv1': (8, 8), 'layer1.0.conv2': (3, 32)}
    path = tmp_path / 'policy.json'
    policy = make_policy(layers, target='int8_runtime')
    policy['target'] = 'subbyte_accel'  # edited by hand: 32 is not held
    path.write_text(json.dumps(policy))
    from gmpq_mm.quantization.targets import TargetError
    from gmpq_mm.utils.budget_checks import check_model_budgets
    cfg = dict(model=dict(backbone=dict(policy=str(path))))
    with pytest.raises(
            TargetError,
            match=rf"^{path}: layer 'layer1.0.conv2' a_bits=32 "
            r"cannot be held by target 'subbyte_accel'"):
        check_model_budgets(cfg)
    # the same file as load_policy reads it (the finetune's backbone)
    from gmpq_mm.quantization.policy import load_policy
    with pytest.raises(TargetError, match='layer1.0.conv2'):
        load_policy(str(path))


def test_export_warns_naming_emulated_layers(tmp_path):
    from gmpq_mm.utils.budget_checks import policy_target_warning
    path = tmp_path / 'policy.json'
    save_policy(
        make_policy({
            'a': (8, 8),
            'b': (4, 8),
            'c': (3, 8),
            'd': (8, 6)
        },
                    target='int8_runtime'), path)
    cfg = dict(model=dict(backbone=dict(policy=str(path))))
    with pytest.warns(UserWarning) as record:
        message = policy_target_warning(cfg)
    assert str(record[0].message) == message
    assert message == (
        f"{path}: target 'int8_runtime' only emulates the widths of 2 "
        'layer(s) (native: w [4, 8], a [8]); they run and are stored at a '
        'wider width: c (w3a8), d (w8a6)')
    save_policy(make_policy({'a': (8, 8)}, target='int8_runtime'), path)
    assert policy_target_warning(cfg) is None


DEMO_INT8_RUNTIME = \
    'configs/gmpq/demo/search_r18_fashion_mnist_int8_runtime.py'


@pytest.mark.parametrize('path, cands, low', [
    ('configs/gmpq/search_r18_cifar10_size.py', [2, 3, 4, 6], 0.98),
    ('configs/gmpq/search_r18_cifar10_int8_runtime.py', [4, 8], 0.95),
    (DEMO_INT8_RUNTIME, [4, 8], 0.95),
])
def test_shipped_configs_reach_their_size_band(path, cands, low):
    """The example configs' budgets hold a policy (any scores), at the
    target's candidates; their early checks pass."""
    import numpy as np
    from mmengine.config import Config

    from gmpq_mm.quantization.budget import (policy_size_mb, size_constraint,
                                             solve_policy)
    from gmpq_mm.quantization.complexity import size_terms
    from gmpq_mm.quantization.layers import is_mixed_layer
    from gmpq_mm.quantization.targets import with_target_candidates
    from gmpq_mm.registry import MODELS
    from gmpq_mm.utils.budget_checks import check_model_budgets
    cfg = Config.fromfile(path)
    check_model_budgets(cfg)
    backbone = cfg.model.backbone.to_dict()
    if cfg.model.get('target'):
        backbone = with_target_candidates(backbone, cfg.model.target)[0]
    assert backbone['w_bits'] == cands
    net = MODELS.build(backbone)
    names = [n for n, m in net.named_modules() if is_mixed_layer(m)]
    fixed, numels = size_terms(net, names)
    fixed += size_terms(MODELS.build(cfg.model.head), [])[0]
    rng = np.random.default_rng(0)
    scores = {
        n: {
            (w, a): float(rng.normal())
            for w in cands
            for a in backbone['a_bits']
        }
        for n in names
    }
    budget = cfg.model.target_size_mb
    policy = solve_policy(scores, [
        size_constraint(fixed, numels, budget,
                        cfg.model.target_size_mb_tolerance)
    ])
    assert low * budget <= policy_size_mb(fixed, numels, policy) <= budget


def test_unreachable_size_budget_is_one_line(tmp_path, repo_root, cifar10_root,
                                             random_teacher):
    cfg = write_search_configs(tmp_path, repo_root, cifar10_root,
                               random_teacher)
    with pytest.raises(SystemExit) as err:
        _train_main()([
            str(cfg), '--work-dir',
            str(tmp_path / 'w'), '--cfg-options', 'model.target_size_mb=0.01'
        ])
    assert str(err.value.code) == (
        'error: size budget 0.01 MB is below the smallest reachable '
        '0.051924 MB of these 19 layers (every layer at its cheapest '
        'allowed bits)')
    assert not (tmp_path / 'w').exists()  # the failed start left nothing
