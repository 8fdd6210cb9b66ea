"""The GMPQ search end to end: tools/train.py with search configs on tiny
CIFAR-format data, against a tiny teacher trained by tools/train.py."""
import json
import shutil

import pytest
import torch
from conftest import write_search_configs  # one conftest.py

# Network order: block 0 of stages 2-4 ends with its 1x1 downsample conv.
R18_LAYERS = []
for s in range(1, 5):
    R18_LAYERS += [f'layer{s}.0.conv1', f'layer{s}.0.conv2']
    R18_LAYERS += [f'layer{s}.0.downsample.0'] if s > 1 else []
    R18_LAYERS += [f'layer{s}.1.conv1', f'layer{s}.1.conv2']

CUSTOM_IMPORTS = "dict(imports=['gmpq_mm.register_all', 'alpha_dump_hook'])"

ALPHA_DUMP_HOOK = '''
import os.path as osp
import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmpretrain.registry import HOOKS


@HOOKS.register_module()
class DumpAlphasHook(Hook):
    """Each rank saves its alphas (the checkpoint holds rank 0's only)."""

    def after_train(self, runner):
        model = runner.model.module if is_model_wrapper(
            runner.model) else runner.model
        torch.save([p.detach().clone() for p in model.arch_parameters()],
                   osp.join(runner.work_dir, f'alphas_rank{get_rank()}.pt'))
'''


@pytest.fixture(scope='module')
def teacher_ckpt(trained_cifar_r18):
    return trained_cifar_r18 / 'epoch_2.pth'


def alphas(ckpt):
    state = torch.load(ckpt, map_location='cpu', weights_only=False)
    return {
        k: v
        for k, v in state['state_dict'].items()
        if k.endswith(('alpha_w', 'alpha_a'))
    }


def test_bilevel_search_writes_policy(tiny_search, teacher_ckpt,
                                      run_in_process):
    # The session's tiny bilevel search: write_search_configs' defaults.
    work, out = tiny_search.work_dir, tiny_search.output
    assert tiny_search.teacher_ckpt == teacher_ckpt
    for key in ('loss_cls', 'loss_attr', 'loss_complexity', 'expected_gbitops',
                'mean_w_bits', 'arch_loss'):
        assert key in out, key
    policy = json.loads((work / 'policy.json').read_text())
    assert list(policy['layers']) == R18_LAYERS
    for bits in policy['layers'].values():
        assert bits['w_bits'] in (2, 3, 4, 6)
        assert bits['a_bits'] in (2, 3, 4, 6)
    assert policy['bitops'] > 0
    assert (work / 'policy_epoch_1.json').is_file()
    # The complexity tool reads the exported policy.
    report = run_in_process([
        'tools/analysis/complexity.py', 'configs/gmpq/pretrain_r18_cifar10.py',
        '--policy', work / 'policy.json'
    ]).output
    assert 'layer4.1.conv2' in report
    # Teacher stayed frozen: identical to its checkpoint.
    ckpt = torch.load(work / 'epoch_2.pth', weights_only=False)
    state = ckpt['state_dict']
    teacher = torch.load(teacher_ckpt, weights_only=False)['state_dict']
    for key, value in teacher.items():
        assert torch.equal(state['teacher.' + key], value), key
    # The checkpoint records each searched layer's candidates (issue 12);
    # the teacher is full precision and absent.
    record = ckpt['meta']['gmpq_bit_widths']
    assert list(record) == [f'backbone.{n}' for n in R18_LAYERS]
    for entry in record.values():
        assert entry['w_candidates'] == [2, 3, 4, 6]
        assert entry['a_candidates'] == [2, 3, 4, 6]


def test_single_level_search(tmp_path, repo_root, cifar10_root, teacher_ckpt,
                             run_in_process):
    cfg = write_search_configs(
        tmp_path,
        repo_root,
        cifar10_root,
        teacher_ckpt,
        base='configs/gmpq/search_r18_cifar10_single.py')
    work = tmp_path / 'work'
    out = run_in_process([
        'tools/train.py', cfg, '--work-dir', work, '--cfg-options',
        'train_cfg.max_epochs=1'
    ]).output
    assert 'arch_loss' not in out and 'loss_attr' in out
    start = alphas(work / 'epoch_1.pth')
    assert any((v - 0.01).abs().max() > 0 for v in start.values())


def test_resume_gives_identical_alphas(tmp_path, tiny_search, run_in_process):
    # Straight through: the session's tiny search (2 epochs, same config).
    cfg, straight = tiny_search.config, tiny_search.work_dir
    resumed = tmp_path / 'resumed'
    # An interruption after epoch 1: only epoch_1.pth survives.
    resumed.mkdir()
    shutil.copy(straight / 'epoch_1.pth', resumed / 'epoch_1.pth')
    out = run_in_process([
        'tools/train.py', cfg, '--work-dir', resumed, '--resume',
        resumed / 'epoch_1.pth'
    ]).output
    assert 'resumed epoch: 1' in out
    a, b = alphas(straight / 'epoch_2.pth'), alphas(resumed / 'epoch_2.pth')
    assert a.keys() == b.keys() and len(a) == 2 * 19
    for key in a:
        assert torch.equal(a[key], b[key]), key
    sa = torch.load(straight / 'epoch_2.pth', weights_only=False)
    sb = torch.load(resumed / 'epoch_2.pth', weights_only=False)
    assert set(sa['optimizer']) == {'weights', 'arch'}
    assert sa['param_schedulers'] == sb['param_schedulers']


def test_two_gloo_processes_keep_alphas_identical(tmp_path, repo_root,
                                                  cifar10_root, teacher_ckpt,
                                                  run_tool, free_tcp_port):
    (tmp_path / 'alpha_dump_hook.py').write_text(ALPHA_DUMP_HOOK)
    cfg = write_search_configs(
        tmp_path,
        repo_root,
        cifar10_root,
        teacher_ckpt,
        custom_imports=CUSTOM_IMPORTS,
        custom_hooks="[dict(type='PolicyExportHook'), "
        "dict(type='DumpAlphasHook')]")
    work = tmp_path / 'work'
    run_tool([
        'tools/dist_train.sh', cfg, '2', '--work-dir', work, '--cfg-options',
        'train_cfg.max_epochs=1'
    ],
             env={
                 'PORT': free_tcp_port,
                 'PYTHONPATH': tmp_path
             })
    rank0 = torch.load(work / 'alphas_rank0.pt')
    rank1 = torch.load(work / 'alphas_rank1.pt')
    assert len(rank0) == 2 * 19
    for a, b in zip(rank0, rank1):
        assert torch.equal(a, b)
    assert any((a - 0.01).abs().max() > 0 for a in rank0)


def test_teacher_with_wrong_classes_fails_before_training(
        tmp_path, repo_root, cifar10_root, teacher_ckpt, run_in_process):
    state = torch.load(teacher_ckpt, weights_only=False)
    sd = state['state_dict']
    sd['head.fc.weight'] = sd['head.fc.weight'][:5]
    sd['head.fc.bias'] = sd['head.fc.bias'][:5]
    bad = tmp_path / 'teacher_5cls.pth'
    torch.save(state, bad)
    cfg = write_search_configs(tmp_path, repo_root, cifar10_root, bad)
    result = run_in_process(
        ['tools/train.py', cfg, '--work-dir', tmp_path / 'w'], check=False)
    assert result.returncode != 0
    assert str(bad) in result.output and 'classes' in result.output
    assert 'Epoch(train)' not in result.output


def test_missing_teacher_checkpoint_is_named(tmp_path, repo_root, cifar10_root,
                                             run_in_process):
    missing = tmp_path / 'nowhere.pth'
    cfg = write_search_configs(tmp_path, repo_root, cifar10_root, missing)
    result = run_in_process(
        ['tools/train.py', cfg, '--work-dir', tmp_path / 'w'], check=False)
    assert result.returncode != 0 and str(missing) in result.output


def test_unreachable_budget_states_smallest_bitops(tmp_path, repo_root,
                                                   cifar10_root, teacher_ckpt,
                                                   run_in_process):
    cfg = write_search_configs(
        tmp_path,
        repo_root,
        cifar10_root,
        teacher_ckpt,
        base='configs/gmpq/search_r18_cifar10_budget.py')
    result = run_in_process([
        'tools/train.py', cfg, '--work-dir', tmp_path / 'w', '--cfg-options',
        'model.target_bitops=1000'
    ],
                            check=False)
    assert result.returncode != 0
    assert 'smallest reachable' in result.output


def test_budget_policy_respects_budget(tmp_path, repo_root, cifar10_root,
                                       teacher_ckpt, run_in_process):
    # All-2-bit over the tiny net's 19 convs at 32x32 is 4 x its MACs;
    # ask for a budget between that and the argmax policy's cost.
    cfg = write_search_configs(
        tmp_path,
        repo_root,
        cifar10_root,
        teacher_ckpt,
        base='configs/gmpq/search_r18_cifar10_budget.py')
    work = tmp_path / 'w'
    run_in_process([
        'tools/train.py', cfg, '--work-dir', work, '--cfg-options',
        'train_cfg.max_epochs=1', 'model.target_bitops=1.5e8'
    ])
    policy = json.loads((work / 'policy.json').read_text())
    assert policy['bitops'] <= 1.5e8
    assert policy['budget'] == 1.5e8


@pytest.mark.parametrize('mode', ['bilevel', 'single'])
def test_arch_warmup_freezes_alphas_first(tmp_path, repo_root, cifar10_root,
                                          teacher_ckpt, run_in_process, mode):
    cfg = write_search_configs(tmp_path, repo_root, cifar10_root, teacher_ckpt)
    work = tmp_path / 'work'
    run_in_process([
        'tools/train.py', cfg, '--work-dir', work, '--cfg-options',
        'train_cfg.max_epochs=2', 'train_cfg.arch_warmup_epochs=1',
        f'train_cfg.mode={mode}'
    ])
    first, second = alphas(work / 'epoch_1.pth'), alphas(work / 'epoch_2.pth')
    # warm-up epoch: every alpha still at its init 0.01 ...
    assert all(
        torch.equal(v, torch.full_like(v, 0.01)) for v in first.values())
    # ... then they move
    assert any((v - 0.01).abs().max() > 0 for v in second.values())


def test_arch_warmup_must_leave_search_epochs(tmp_path, repo_root,
                                              cifar10_root, teacher_ckpt,
                                              run_in_process):
    cfg = write_search_configs(tmp_path, repo_root, cifar10_root, teacher_ckpt)
    result = run_in_process([
        'tools/train.py', cfg, '--work-dir', tmp_path / 'work',
        '--cfg-options', 'train_cfg.max_epochs=2',
        'train_cfg.arch_warmup_epochs=2'
    ],
                            check=False)
    assert result.returncode != 0
    assert 'arch_warmup_epochs must be an integer in [0, max_epochs=2)' in \
        result.output


TEMPERATURE_HOOK = '''
import json
import os.path as osp
from mmengine.hooks import Hook
from mmpretrain.registry import HOOKS


@HOOKS.register_module()
class RecordTemperatureHook(Hook):
    """Every layer's softmax temperature after each iteration."""

    def before_train(self, runner):
        self.seen = []

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.seen.append(sorted({m.temperature for m in runner.model.modules()
                                 if hasattr(m, 'alpha_w')}))

    def after_train(self, runner):
        with open(osp.join(runner.work_dir, 'temperatures.json'), 'w') as f:
            json.dump(self.seen, f)
'''


def test_temperature_schedule(tmp_path, repo_root, cifar10_root, teacher_ckpt,
                              run_in_process):
    (tmp_path / 'temperature_hook.py').write_text(TEMPERATURE_HOOK)
    cfg = write_search_configs(
        tmp_path,
        repo_root,
        cifar10_root,
        teacher_ckpt,
        custom_imports="dict(imports=['gmpq_mm.register_all', "
        "'temperature_hook'])",
        custom_hooks="[dict(type='RecordTemperatureHook')]")
    work = tmp_path / 'work'
    run_in_process([
        'tools/train.py', cfg, '--work-dir', work, '--cfg-options',
        'train_cfg.max_epochs=3', 'train_cfg.arch_warmup_epochs=1',
        'train_cfg.temperature.start=2.0', 'train_cfg.temperature.end=0.125'
    ],
                   env={'PYTHONPATH': tmp_path})
    seen = json.loads((work / 'temperatures.json').read_text())
    assert all(len(ts) == 1 for ts in seen)  # every layer alike
    ts = [t[0] for t in seen]
    n = len(ts) // 3  # iterations per epoch
    assert n >= 2 and len(ts) == 3 * n
    # warm-up at T0, then geometric to T1 at the last iteration
    assert ts[:n] == [2.0] * n
    for i, t in enumerate(ts[n:], start=1):
        assert t == pytest.approx(2.0 * (0.125 / 2.0)**(i / (2 * n)))
    assert ts[-1] == pytest.approx(0.125)


def test_temperature_is_checked(tmp_path, repo_root, cifar10_root,
                                teacher_ckpt, run_in_process):
    cfg = write_search_configs(tmp_path, repo_root, cifar10_root, teacher_ckpt)
    result = run_in_process([
        'tools/train.py', cfg, '--work-dir', tmp_path / 'work',
        '--cfg-options', 'train_cfg.temperature.start=1.0',
        'train_cfg.temperature.end=0'
    ],
                            check=False)
    assert result.returncode != 0
    assert "temperature['end'] must be a number > 0, got 0" in result.output


def test_budget_complexity_makes_budgets_differ(tmp_path, repo_root,
                                                cifar10_root, teacher_ckpt,
                                                run_in_process):
    """With the released linear cost the budget changes only the exported
    policy; measured against the budget, two budgets train differently."""
    cfg = write_search_configs(
        tmp_path,
        repo_root,
        cifar10_root,
        teacher_ckpt,
        base='configs/gmpq/search_r18_cifar10_budget.py')
    found = {}
    for mode in ('reference', 'budget'):
        # all-2-bit is 3.46e7 here, uniform alphas expect 1.21e8
        for budget in ('6e7', '1.5e8'):
            work = tmp_path / f'{mode}_{budget}'
            run_in_process([
                'tools/train.py', cfg, '--work-dir', work, '--cfg-options',
                'train_cfg.max_epochs=1', f'model.target_bitops={budget}',
                f'model.complexity_loss.mode={mode}',
                'model.complexity_loss.loss_weight=1.0'
            ])
            found[mode, budget] = alphas(work / 'epoch_1.pth')
    same = found['reference', '6e7'], found['reference', '1.5e8']
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])
    low, high = found['budget', '6e7'], found['budget', '1.5e8']
    assert any(not torch.equal(low[k], high[k]) for k in low)
