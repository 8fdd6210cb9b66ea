"""Stage 3 end to end on tiny data: finetune from a policy file with
calibration (one process and two gloo processes), tools/test.py --out,
export to a packed artifact and back, and the errors of bad inputs."""
import importlib.util
import json

import pytest
import torch

CONFIG = 'configs/gmpq/finetune_r18_in1k.py'
BASE = 8  # channels of the tiny ResNet-18 (stem and first stage)


def _cli(options):
    out = []
    for key, value in options.items():
        if isinstance(value, (list, tuple)):
            value = '[' + ','.join(str(v) for v in value) + ']'
        out.append(f'{key}={value}')
    return out


def _options(data_root, policy, fp_checkpoint, classes):
    """Shrink finetune_r18_in1k.py: 8-channel ResNet-18, 3 classes, 32 px
    crops, batch 2, one epoch, a small lr (a random-init 2-bit net at lr
    0.01 and batch 2 diverges, calibrated or not), coarse histograms."""
    opts = {
        'model.backbone.policy': str(policy),
        'model.backbone.backbone.stem_channels': BASE,
        'model.backbone.backbone.base_channels': BASE,
        'model.backbone.backbone.init_cfg.checkpoint': str(fp_checkpoint),
        'model.head.num_classes': 3,
        'model.head.in_channels': BASE * 8,
        'model.head.topk': [1, 2],
        'data_preprocessor.num_classes': 3,
        'optim_wrapper.optimizer.lr': 1e-4,
        'train_cfg.max_epochs': 1,
        'default_hooks.logger.interval': 1,
        'env_cfg.mp_cfg.mp_start_method': 'fork',
        'randomness.seed': 0,
        'custom_hooks.0.bins': 256,
        'train_dataloader.dataset.pipeline.1.scale': 32,
        'val_evaluator.topk': [1, 2],
        'test_evaluator.topk': [1, 2],
    }
    for phase in ('train', 'val', 'test'):
        opts.update({
            f'{phase}_dataloader.batch_size':
            2,
            f'{phase}_dataloader.num_workers':
            0,
            f'{phase}_dataloader.persistent_workers':
            False,
            f'{phase}_dataloader.dataset.data_root':
            str(data_root),
            f'{phase}_dataloader.dataset.metainfo.classes':
            list(classes),
        })
        if phase != 'train':
            opts[f'{phase}_dataloader.dataset.pipeline.1.scale'] = 36
            opts[f'{phase}_dataloader.dataset.pipeline.2.crop_size'] = 32
    return opts


def _build(cfg):
    from mmengine.registry import init_default_scope

    from gmpq_mm.registry import MODELS
    init_default_scope('mmpretrain')
    return MODELS.build(cfg)


def _backbone_cfg(**kw):
    cfg = dict(
        type='QuantizedBackbone',
        backbone=dict(
            type='ResNet',
            depth=18,
            stem_channels=BASE,
            base_channels=BASE,
            out_indices=(3, )))
    cfg.update(kw)
    return cfg


@pytest.fixture(scope='module')
def setup(tmp_path_factory, imagenet_root):
    """A tiny FP mmpretrain checkpoint, a mixed policy file, the options."""
    from gmpq_mm.quantization.convert import select_layers
    from gmpq_mm.quantization.policy import make_policy, save_policy
    folder = tmp_path_factory.mktemp('finetune_setup')
    torch.manual_seed(0)
    fp = _build(
        dict(
            type='ImageClassifier',
            backbone=dict(
                type='ResNet',
                depth=18,
                stem_channels=BASE,
                base_channels=BASE,
                out_indices=(3, )),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(
                type='LinearClsHead', num_classes=3, in_channels=BASE * 8)))
    fp.init_weights()
    torch.save({
        'state_dict': fp.state_dict(),
        'meta': {}
    }, folder / 'fp_r18_tiny.pth')
    names = select_layers(fp.backbone)
    cands = [2, 3, 4, 6]
    policy = make_policy(
        {
            n: (cands[i % 4], cands[(i + 1) % 4])
            for i, n in enumerate(names)
        },
        w_candidates=cands,
        a_candidates=cands,
        input_shape=[3, 32, 32])
    save_policy(policy, folder / 'policy.json')
    from conftest import IMAGENET_CLASSES  # noqa: the fixture's classes
    opts = _options(imagenet_root, folder / 'policy.json',
                    folder / 'fp_r18_tiny.pth', IMAGENET_CLASSES)
    return dict(folder=folder, policy=policy, options=opts, fp=fp)


@pytest.fixture(scope='module')
def finetuned(setup, tmp_path_factory):
    from conftest import run_in_process
    work_dir = tmp_path_factory.mktemp('finetune_r18')
    result = run_in_process(
        ['tools/train.py', CONFIG, '--work-dir', work_dir, '--cfg-options'] +
        _cli(setup['options']))
    (work_dir / 'train_output.txt').write_text(result.output)
    return work_dir


def test_finetune_calibrates_and_trains(setup, finetuned):
    out = (finetuned / 'train_output.txt').read_text()
    assert 'load backbone in model from' in out
    assert 'CalibrationHook: 19 layers calibrated (method release' in out
    assert 'Epoch(train) [1][6/6]' in out and 'accuracy/top1' in out
    ckpt = torch.load(
        finetuned / 'epoch_1.pth', map_location='cpu', weights_only=False)
    record = ckpt['meta']['gmpq_calibration']
    assert record['world_size'] == 1 and record['images'] == 2
    saved = json.loads((finetuned / 'calibration.json').read_text())
    for name, entry in setup['policy']['layers'].items():
        row = saved['layers']['backbone.' + name]
        assert (row['w_bits'], row['a_bits']) == (entry['w_bits'],
                                                  entry['a_bits'])
        assert row['act_range'] < 6.0
        r = ckpt['state_dict'][f'backbone.{name}.act_range']
        assert torch.isfinite(r) and 0 < float(r) < 6.0
    assert all(
        torch.isfinite(v).all() for v in ckpt['state_dict'].values()
        if v.is_floating_point())


def test_test_tool_prints_accuracy_and_bitops(setup, finetuned):
    from conftest import run_in_process
    out_json = finetuned / 'test_result.json'
    result = run_in_process([
        'tools/test.py', CONFIG, finetuned /
        'epoch_1.pth', '--work-dir', finetuned /
        'test', '--out', out_json, '--cfg-options'
    ] + _cli(setup['options']))
    assert 'accuracy/top1' in result.output and 'BitOPs' in result.output
    report = json.loads(out_json.read_text())
    assert {'accuracy/top1', 'accuracy/top2'} <= set(report['metrics'])
    c = report['complexity']
    assert c['input_shape'] == [3, 32, 32] and c['num_quantized'] == 19
    assert c['bitops_quantized'] > 0 and c['compression'] > 1
    assert c['size_mb'] < c['fp_size_mb']


def _export_tool():
    spec = importlib.util.spec_from_file_location('gmpq_export_tool',
                                                  'tools/deploy/export.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_reload_equals_fake_quant(setup, finetuned, repo_root,
                                         monkeypatch):
    from gmpq_mm.apis import build_deployed_model
    monkeypatch.chdir(repo_root)
    out = finetuned / 'r18_tiny.safetensors'
    summary = _export_tool().main([
        CONFIG,
        str(finetuned / 'epoch_1.pth'), '--out',
        str(out), '--json',
        str(finetuned / 'export.json'), '--cfg-options'
    ] + _cli(setup['options']))
    assert summary['max_abs_diff'] <= 1e-5
    assert summary['bytes'] == out.stat().st_size
    # A 0.1 MB net: the header (per-tensor checksums) and the BN statistics
    # weigh; the ResNet-18 test of test_export.py checks the size (< 2 %).
    assert 1.0 <= summary['size_ratio'] < 2
    # The tool rebuilt the network from the artifact alone and compared it
    # with the checkpoint's fake-quantized network (max_abs_diff above);
    # the rebuilt network carries the policy and a self-contained config.
    deployed, meta = build_deployed_model(str(out))
    assert meta['policy']['layers'] == setup['policy']['layers']
    assert 'init_cfg' not in json.dumps(meta['config'])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(deployed(images, mode='tensor')).all()


@pytest.mark.parametrize('change, match', [
    ('missing', r'bad\.json.*missing layer\(s\) \[\'layer1\.0\.conv1\'\]'),
    ('extra', r"bad\.json.*\['conv1'\] not quantized by the model"),
    ('bits', r'bad\.json.*layers\[layer2\.0\.conv2\] w_bits.*16'),
])
def test_bad_policy_names_file_and_layer(setup, tmp_path, change, match):
    policy = json.loads(json.dumps(setup['policy']))
    layers = policy['layers']
    if change == 'missing':
        del layers['layer1.0.conv1']
    elif change == 'extra':
        layers['conv1'] = {'w_bits': 4, 'a_bits': 4}
    else:
        layers['layer2.0.conv2']['w_bits'] = 16
        policy.pop('w_candidates')
    (tmp_path / 'bad.json').write_text(json.dumps(policy))
    with pytest.raises(ValueError, match=match):
        _build(_backbone_cfg(policy=str(tmp_path / 'bad.json')))


def test_dist_finetune_calibrates_identically(setup, tmp_path, free_tcp_port):
    from conftest import run_tool
    work_dir = tmp_path / 'dist'
    result = run_tool(
        [
            'tools/dist_train.sh', CONFIG, 2, '--work-dir', work_dir,
            '--cfg-options'
        ] + _cli(setup['options']),
        env={'PORT': free_tcp_port},
        timeout=400)
    saved = json.loads((work_dir / 'calibration.json').read_text())
    assert saved['world_size'] == 2 and saved['images'] == 4
    digests = saved['rank_digests']
    assert len(digests) == 2 and digests[0] == digests[1] == saved['digest']
    assert f"on every rank: ['{digests[0]}', '{digests[0]}']" in \
        result.output
    ckpt = torch.load(
        work_dir / 'epoch_1.pth', map_location='cpu', weights_only=False)
    assert ckpt['meta']['gmpq_calibration']['digest'] == saved['digest']


# ---- the bit widths a checkpoint was trained with (issue 12) ----------------
def _policy_b(setup, tmp_path):
    """Policy A with the weight bits of its second layer changed."""
    policy = json.loads(json.dumps(setup['policy']))
    name = list(policy['layers'])[1]
    entry = policy['layers'][name]
    entry['w_bits'] = 6 if entry['w_bits'] != 6 else 2
    path = tmp_path / 'policy_b.json'
    path.write_text(json.dumps(policy))
    return name, path


def test_checkpoint_records_bit_widths(setup, finetuned):
    ckpt = torch.load(
        finetuned / 'epoch_1.pth', map_location='cpu', weights_only=False)
    record = ckpt['meta']['gmpq_bit_widths']
    want = {f'backbone.{n}': e for n, e in setup['policy']['layers'].items()}
    assert record == want


def test_test_tool_refuses_another_policy(setup, finetuned, tmp_path):
    from conftest import run_in_process
    layer, policy_b = _policy_b(setup, tmp_path)
    options = dict(setup['options'], **{'model.backbone.policy': policy_b})
    ckpt = finetuned / 'epoch_1.pth'
    result = run_in_process(
        [
            'tools/test.py', CONFIG, ckpt, '--work-dir', tmp_path / 'test',
            '--cfg-options'
        ] + _cli(options),
        check=False)
    assert result.returncode != 0
    assert f"first difference at layer 'backbone.{layer}'" in result.output
    assert str(ckpt) in result.output and str(policy_b) in result.output
    assert 'accuracy/top1' not in result.output


def test_export_refuses_another_policy(setup, finetuned, tmp_path, repo_root,
                                       monkeypatch):
    monkeypatch.chdir(repo_root)
    layer, policy_b = _policy_b(setup, tmp_path)
    options = dict(setup['options'], **{'model.backbone.policy': policy_b})
    out = tmp_path / 'b.safetensors'
    with pytest.raises(ValueError, match=rf"backbone\.{layer}.*w_bits") as e:
        _export_tool().main([
            CONFIG,
            str(finetuned / 'epoch_1.pth'), '--out',
            str(out), '--cfg-options'
        ] + _cli(options))
    assert str(policy_b) in str(e.value) and 'epoch_1.pth' in str(e.value)
    assert not out.exists()


def test_load_from_refuses_another_policy(setup, finetuned, tmp_path):
    from conftest import run_in_process
    layer, policy_b = _policy_b(setup, tmp_path)
    options = dict(
        setup['options'], **{
            'model.backbone.policy': policy_b,
            'load_from': finetuned / 'epoch_1.pth'
        })
    result = run_in_process(
        [
            'tools/train.py', CONFIG, '--work-dir', tmp_path / 'wd',
            '--cfg-options'
        ] + _cli(options),
        check=False)
    assert result.returncode != 0
    assert f"first difference at layer 'backbone.{layer}'" in result.output
    assert 'Epoch(train)' not in result.output


def test_attribution_refuses_another_policy(setup, finetuned, tmp_path,
                                            repo_root, monkeypatch):
    from mmengine.config import Config

    from gmpq_mm.apis.attribution import load_attribution_models
    monkeypatch.chdir(repo_root)
    layer, policy_b = _policy_b(setup, tmp_path)
    options = dict(setup['options'], **{'model.backbone.policy': policy_b})
    cfg = Config.fromfile(CONFIG)
    cfg.merge_from_dict({
        k: (str(v) if hasattr(v, 'is_file') else v)
        for k, v in options.items()
    })
    teacher = tmp_path / 'teacher.py'
    teacher.write_text(
        "model = dict(type='ImageClassifier', backbone=dict(type='ResNet', "
        f"depth=18, stem_channels={BASE}, base_channels={BASE}, "
        "out_indices=(3, )), neck=dict(type='GlobalAveragePooling'), "
        "head=dict(type='LinearClsHead', num_classes=3, "
        f"in_channels={BASE * 8}))\n")
    with pytest.raises(ValueError, match=rf"backbone\.{layer}"):
        load_attribution_models(
            cfg,
            str(finetuned / 'epoch_1.pth'),
            teacher_config=str(teacher),
            teacher_checkpoint=str(setup['folder'] / 'fp_r18_tiny.pth'))


def test_checkpoint_without_record_warns_once(setup, finetuned, tmp_path):
    from mmengine.logging import MMLogger

    from gmpq_mm.utils.bit_record import check_bit_widths
    model = _build(
        dict(
            type='ImageClassifier',
            backbone=_backbone_cfg(policy=setup['policy']),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(
                type='LinearClsHead', num_classes=3, in_channels=BASE * 8)))
    logger = MMLogger.get_instance('bit_record_test')
    seen = []
    handler = __import__('logging').Handler()
    handler.emit = lambda rec: seen.append(rec.getMessage())
    logger.addHandler(handler)
    old = str(tmp_path / 'old.pth')
    for _ in range(3):
        check_bit_widths(model, {'meta': {}}, old, 'p.json')
    logger.removeHandler(handler)
    assert len([m for m in seen if old in m]) == 1
    assert 'does not record the bit widths' in seen[0]
    # An FP checkpoint (empty record) is a valid start for any policy.
    check_bit_widths(model, {'meta': {'gmpq_bit_widths': {}}}, old, 'p.json')
