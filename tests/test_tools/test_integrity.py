"""Trust and integrity (issue 12): no code from data files, strict-flag
parsing, load errors that name the file, late failures moved to the start,
no litter."""
import json
import pickle
from pathlib import Path

import pytest
import torch

from gmpq_mm.registry import MODELS
from gmpq_mm.utils import register_all_modules

register_all_modules()

BACKBONE = dict(
    type='ResNet_CIFAR',
    depth=18,
    stem_channels=8,
    base_channels=8,
    out_indices=(3, ))
HEAD = dict(
    type='LinearClsHead',
    num_classes=10,
    in_channels=64,
    loss=dict(type='CrossEntropyLoss'))
TEACHER = dict(
    type='ImageClassifier',
    backbone=BACKBONE,
    neck=dict(type='GlobalAveragePooling'),
    head=HEAD)


def _quantized_classifier():
    from mmengine.registry import init_default_scope
    init_default_scope('mmpretrain')
    return MODELS.build(
        dict(
            type='ImageClassifier',
            backbone=dict(
                type='QuantizedBackbone',
                backbone=BACKBONE,
                w_bits=4,
                a_bits=4),
            neck=dict(type='GlobalAveragePooling'),
            head=HEAD)).eval()


# ------------------------------------------------ artifacts run no code ----
def _marker_config(tmp_path):
    """A config file that leaves a marker file when executed."""
    marker = tmp_path / 'config_ran'
    path = tmp_path / 'x.py'
    path.write_text(f"open({str(marker)!r}, 'w').close()\nmodel = "
                    f"{TEACHER!r}\n")
    return path, marker


def test_artifact_with_search_config_runs_nothing(tmp_path, monkeypatch):
    """The probe: a valid artifact whose config is a search model naming
    teacher='x.py' (and a pickle teacher checkpoint)."""
    from gmpq_mm.apis import build_deployed_model
    from gmpq_mm.quantization.export import ArtifactError, save_artifact
    config, marker = _marker_config(tmp_path)
    ckpt = tmp_path / 'teacher.pth'
    torch.save({'state_dict': MODELS.build(TEACHER).state_dict()}, ckpt)
    search_cfg = dict(
        type='GMPQSearchClassifier',
        backbone=dict(type='MixedPrecisionBackbone', backbone=BACKBONE),
        neck=dict(type='GlobalAveragePooling'),
        head=HEAD,
        teacher=str(config),
        teacher_checkpoint=str(ckpt))
    path = tmp_path / 'evil.safetensors'
    save_artifact(path, _quantized_classifier(), config=search_cfg)
    for strict in ('0', '1'):
        monkeypatch.setenv('GMPQ_MM_STRICT_LOAD', strict)
        with pytest.raises(ArtifactError, match=str(path)):
            build_deployed_model(str(path))
        assert not marker.exists()


@pytest.mark.parametrize('change, match', [
    (lambda c: c['backbone'].update(policy='/tmp/p.json'), 'not a file'),
    (lambda c: c.update(type='GMPQSearchClassifier'), 'not a deployable'),
    (lambda c: c['backbone']['backbone'].update(
        init_cfg=dict(type='Pretrained', checkpoint='x.pth')), 'init_cfg'),
    (lambda c: c['head'].update(type='mmpretrain.Evil'), 'Evil'),
    (lambda c: c.update(teacher='x.py'), 'teacher'),
])
def test_artifact_config_allow_list(tmp_path, change, match):
    from mmengine.config import Config

    from gmpq_mm.apis import build_deployed_model, deploy_model_config
    from gmpq_mm.quantization.export import ArtifactError, save_artifact
    model = _quantized_classifier()
    good = deploy_model_config(
        Config(
            dict(
                model=dict(
                    type='ImageClassifier',
                    backbone=dict(
                        type='QuantizedBackbone',
                        backbone=BACKBONE,
                        w_bits=4,
                        a_bits=4),
                    neck=dict(type='GlobalAveragePooling'),
                    head=HEAD))), model)
    save_artifact(tmp_path / 'good.safetensors', model, config=good)
    rebuilt, _ = build_deployed_model(str(tmp_path / 'good.safetensors'))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x, mode='tensor'), model(x, mode='tensor'))
    bad = json.loads(json.dumps(good))
    change(bad)
    save_artifact(tmp_path / 'bad.safetensors', model, config=bad)
    with pytest.raises(ArtifactError, match=match):
        build_deployed_model(str(tmp_path / 'bad.safetensors'))


# ------------------------------------------- every switch, the same words ---
SWITCHES = ('GMPQ_MM_STRICT_LOAD', 'GMPQ_MM_TRUST_CHECKPOINTS',
            'GMPQ_MM_SKIP_VERSION_CHECK')


@pytest.mark.parametrize('name', SWITCHES)
@pytest.mark.parametrize('value, on', [('1', True), ('true', True),
                                       ('TRUE', True), ('yes', True),
                                       ('On', True), ('0', False),
                                       ('false', False), ('no', False),
                                       ('OFF', False), ('', False),
                                       (None, False)])
def test_switch_values(monkeypatch, name, value, on):
    from gmpq_mm.utils.env_flags import env_flag
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    assert env_flag(name) is on


@pytest.mark.parametrize('name', SWITCHES)
def test_switch_typo_is_an_error(monkeypatch, name):
    from gmpq_mm.utils.env_flags import env_flag
    monkeypatch.setenv(name, 'ture')
    with pytest.raises(ValueError, match=f"{name}='ture'"):
        env_flag(name)


def test_strict_flag_reads_the_same_words(monkeypatch):
    from gmpq_mm.engine.checkpoint_load import strict_load_enabled
    monkeypatch.setenv('GMPQ_MM_STRICT_LOAD', 'Yes')
    assert strict_load_enabled() is True
    monkeypatch.setenv('GMPQ_MM_STRICT_LOAD', 'ture')
    with pytest.raises(ValueError, match="GMPQ_MM_STRICT_LOAD='ture'"):
        strict_load_enabled()


def test_version_check_switch_takes_every_on_word(monkeypatch):
    from gmpq_mm import compat
    real = compat._installed_version
    monkeypatch.setattr(compat, '_installed_version', lambda m: '2.0.1'
                        if m == 'torch' else real(m))
    for word in ('1', 'true', 'yes', 'ON'):
        monkeypatch.setenv(compat.SKIP_CHECK_ENV, word)
        compat.check_versions()  # skipped
    monkeypatch.setenv(compat.SKIP_CHECK_ENV, 'off')
    with pytest.raises(compat.UnsupportedStackError, match='torch 2.0.1'):
        compat.check_versions()


class _Payload:

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


@pytest.mark.parametrize('value', ['true', 'YES', 'on', '1'])
def test_strict_checkpoint_refuses_payload(tmp_path, monkeypatch, value):
    from gmpq_mm.engine.checkpoint_load import load_checkpoint_file
    marker = tmp_path / 'ran'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'x': _Payload(str(marker))}, path)
    monkeypatch.setenv('GMPQ_MM_STRICT_LOAD', value)
    with pytest.raises(pickle.UnpicklingError, match=str(path)):
        load_checkpoint_file(str(path))
    assert not marker.exists()


# ------------------------------------------- load errors name the file -----
def _bad_files(tmp_path):
    good = tmp_path / 'good.pth'
    torch.save({'state_dict': MODELS.build(TEACHER).state_dict()}, good)
    data = good.read_bytes()
    files = {
        'empty': b'',
        'truncated': data[:len(data) // 2],
        'text': b'this is not a checkpoint\n',
    }
    for name, content in files.items():
        (tmp_path / f'{name}.pth').write_bytes(content)
    return [tmp_path / f'{name}.pth' for name in files]


def test_unreadable_checkpoint_names_file(tmp_path):
    from gmpq_mm.engine.checkpoint_load import load_checkpoint_file
    for path in _bad_files(tmp_path):
        with pytest.raises(ValueError, match=str(path)):
            load_checkpoint_file(str(path))


def test_unreadable_teacher_names_file(tmp_path):
    for path in _bad_files(tmp_path):
        with pytest.raises(ValueError, match=str(path)):
            _search_model(str(path))


def _search_model(teacher_ckpt, **kw):
    return MODELS.build(
        dict(
            type='GMPQSearchClassifier',
            backbone=dict(
                type='MixedPrecisionBackbone',
                backbone=BACKBONE,
                w_bits=[2, 4],
                a_bits=[2, 4]),
            neck=dict(type='GlobalAveragePooling'),
            head=HEAD,
            teacher=TEACHER,
            teacher_checkpoint=teacher_ckpt,
            input_shape=(3, 32, 32),
            **kw))


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_non_finite_teacher_fails_at_build(tmp_path, bad):
    state = MODELS.build(TEACHER).state_dict()
    state['backbone.layer2.0.conv1.weight'][0, 0, 0, 0] = bad
    path = tmp_path / 'nan_teacher.pth'
    torch.save({'state_dict': state}, path)
    with pytest.raises(
            ValueError,
            match=rf'{path}.*non-finite.*'
            r'backbone\.layer2\.0\.conv1\.weight'):
        _search_model(str(path))


def test_non_finite_init_checkpoint_fails(tmp_path):
    """init_cfg / load_from go through mmengine's CheckpointLoader."""
    from mmengine.runner import load_checkpoint
    state = MODELS.build(TEACHER).state_dict()
    state['head.fc.bias'][3] = float('nan')
    path = tmp_path / 'nan_init.pth'
    torch.save({'state_dict': state}, path)
    with pytest.raises(ValueError, match=rf'{path}.*head\.fc\.bias'):
        load_checkpoint(MODELS.build(TEACHER), str(path))


# ------------------------------------------- failures at the start --------
def test_empty_imagenet_root_fails_before_start(tmp_path, run_tool):
    root = tmp_path / 'imagenet'
    root.mkdir()
    result = run_tool([
        'tools/train.py', 'configs/gmpq/finetune_r18_fp_in1k.py', '--work-dir',
        tmp_path / 'wd', '--cfg-options',
        f'train_dataloader.dataset.data_root={root}',
        f'val_dataloader.dataset.data_root={root}'
    ],
                      check=False)
    assert result.returncode != 0
    assert str(root / 'train') in result.output
    assert 'Traceback' not in result.output
    assert not (tmp_path / 'wd').exists()  # nothing created


def test_empty_last_checkpoint_is_named(tmp_path):
    from mmengine.config import Config

    from gmpq_mm.utils import check_paths
    (tmp_path / 'last_checkpoint').write_text('\n')
    cfg = Config(dict(work_dir=str(tmp_path), resume=True, load_from=None))
    with pytest.raises(
            FileNotFoundError,
            match=rf'{tmp_path / "last_checkpoint"} is empty'):
        check_paths(cfg)
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'gone.pth'))
    with pytest.raises(FileNotFoundError, match='gone.pth'):
        check_paths(cfg)


def test_failing_rerun_keeps_config_dump(tmp_path, trained_cifar_r18,
                                         cifar10_root, tiny_cifar_cfg,
                                         run_tool):
    import shutil
    work = tmp_path / 'work'
    shutil.copytree(trained_cifar_r18, work)
    dump = work / 'pretrain_r18_cifar10.py'
    before = dump.read_bytes()
    ckpts = sorted(p.name for p in work.glob('*.pth'))
    bad_root = tmp_path / 'cifar'
    shutil.copytree(cifar10_root, bad_root)
    (bad_root / 'cifar-10-batches-py' / 'data_batch_3').write_bytes(b'x')
    result = run_tool(
        ['tools/train.py'] + tiny_cifar_cfg(work, bad_root, max_epochs=5),
        check=False)
    assert result.returncode != 0
    assert 'data_batch_3' in result.output
    assert dump.read_bytes() == before
    assert sorted(p.name for p in work.glob('*.pth')) == ckpts
    # A fresh work_dir of a failed start is not left behind.
    fresh = tmp_path / 'fresh'
    result = run_tool(
        ['tools/train.py'] + tiny_cifar_cfg(fresh, bad_root), check=False)
    assert result.returncode != 0 and not fresh.exists()


def test_killed_writer_temp_file_is_cleaned(tmp_path):
    import subprocess
    import sys

    from gmpq_mm.quantization.atomic_file import write_text_atomic
    target = tmp_path / 'policy.json'
    # A writer killed mid-write (SIGKILL: no clean-up) leaves its temp file.
    proc = subprocess.Popen(
        [sys.executable, '-c', 'import time; '
         'time.sleep(30)'])
    stale = tmp_path / f'.policy.json.{proc.pid}.abc123.tmp'
    stale.write_text('{"half": ')
    older = tmp_path / '.policy.json.q8z_lk2.tmp'  # pre-pid naming
    older.write_text('{')
    write_text_atomic(str(target), '{}\n')
    assert stale.exists()  # its writer is alive: not touched
    proc.kill()
    proc.wait()
    write_text_atomic(str(target), '{"a": 1}\n')
    assert not stale.exists() and not older.exists()
    assert [p.name for p in tmp_path.iterdir()] == ['policy.json']
    assert target.read_text() == '{"a": 1}\n'


@pytest.mark.parametrize('start_epoch, kept', [(0, []), (2, [1, 2])])
def test_earlier_run_policy_epochs_removed(tmp_path, start_epoch, kept):
    """A fresh run (epoch 0) drops every policy_epoch_N.json of an earlier
    run; a run resumed at epoch 2 keeps 1 and 2 (its own) and drops 3..5."""
    import logging
    from types import SimpleNamespace

    from gmpq_mm.engine.hooks import PolicyExportHook
    for n in range(1, 6):
        (tmp_path / f'policy_epoch_{n}.json').write_text('{}')
    (tmp_path / 'policy.json').write_text('{}')
    runner = SimpleNamespace(
        work_dir=str(tmp_path),
        epoch=start_epoch,
        logger=logging.getLogger('t'))
    PolicyExportHook().before_train(runner)
    left = sorted(
        int(p.stem.split('_')[-1])
        for p in tmp_path.glob('policy_epoch_*.json'))
    assert left == kept
    assert (tmp_path / 'policy.json').exists()


def test_artifact_scope_key(tmp_path):
    """``_scope_`` (mmengine adds it to inherited configs) may only name
    the OpenMMLab scopes the deployed network is built in."""
    from gmpq_mm.apis.deploy import check_deployable_config
    cfg = dict(
        type='ImageClassifier',
        _scope_='mmpretrain',
        backbone=dict(type='ResNet_CIFAR', depth=18, _scope_='mmpretrain'))
    check_deployable_config(cfg, 'a.safetensors')
    cfg['backbone']['_scope_'] = 'mmdet'
    with pytest.raises(ValueError, match=r"a\.safetensors.*'mmdet'"):
        check_deployable_config(cfg, 'a.safetensors')
    cfg['backbone'].update(_scope_='mmpretrain', type='mmdet.ResNet_CIFAR')
    with pytest.raises(ValueError, match='mmdet.ResNet_CIFAR'):
        check_deployable_config(cfg, 'a.safetensors')


def test_every_tool_stops_in_one_line_on_an_unsupported_stack(monkeypatch):
    """The tools register through ``register_for_tool``: an out-of-range
    package ends them with one line naming it, not a traceback."""
    from gmpq_mm import compat
    from gmpq_mm.utils import setup_env
    from gmpq_mm.utils.cli import register_for_tool
    monkeypatch.setattr(setup_env, '_done', False)  # as in a fresh tool
    real = compat._installed_version
    monkeypatch.setattr(compat, '_installed_version', lambda m: '2.0.1'
                        if m == 'torch' else real(m))
    monkeypatch.delenv(compat.SKIP_CHECK_ENV, raising=False)
    with pytest.raises(SystemExit) as info:
        register_for_tool()
    message = str(info.value)
    assert 'torch 2.0.1' in message and '\n' not in message
    tools = Path(__file__).resolve().parents[2] / 'tools'
    bare = [
        str(p.relative_to(tools)) for p in tools.rglob('*.py')
        if 'register_all_modules()' in p.read_text()
        and 'fail_in_one_line' not in p.read_text()
    ]
    assert bare == []
