"""MobileNetV2 through GMPQ (docs/user_guides/new_backbone.md).

The three MobileNetV2 configs build; the supernet searches exactly the convs
of mmpretrain's MobileNetV2 but the stem, signed where the input can be
negative; the attribution map has 4x4 pixels at the 128-pixel search size
(1x1 at 32); ``tools/train.py`` runs the search on tiny CIFAR-format data
and writes a policy naming those convs, which the finetune config applies.
A width-0.25 network keeps it fast; module names do not depend on width.
"""
import json
import textwrap
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmpretrain.models.backbones import MobileNetV2

from gmpq_mm.models.utils import attribution_map
from gmpq_mm.quantization.layers import is_mixed_layer, is_quantized_layer
from gmpq_mm.registry import MODELS
from gmpq_mm.utils import register_all_modules

register_all_modules()

PRETRAIN = 'configs/gmpq/pretrain_mbv2_cifar10.py'
SEARCH = 'configs/gmpq/search_mbv2_cifar10.py'
FINETUNE = 'configs/gmpq/finetune_mbv2_in1k.py'
WIDEN = 0.25
ROOT = Path(__file__).resolve().parents[2]

init_default_scope('mmpretrain')


def mbv2_convs():
    """Names of MobileNetV2's convs but the stem, in network order, from
    mmpretrain's ``arch_settings`` (expand_ratio, channels, blocks,
    stride): blocks with expand_ratio 1 have no 1x1 expansion."""
    names = []
    for i, (ratio, _, blocks, _) in enumerate(MobileNetV2.arch_settings):
        for block in range(blocks):
            convs = 2 if ratio == 1 else 3
            names += [
                f'layer{i + 1}.{block}.conv.{k}.conv' for k in range(convs)
            ]
    return names + ['conv2.conv']


def signed_convs():
    """Convs whose input can be negative: the 1x1 expansions (fed by a
    linear bottleneck or a residual sum) and conv2 (after the last
    projection). Depthwise and projection convs follow a ReLU6."""
    names = mbv2_convs()
    return {
        n
        for n in names if n == 'conv2.conv' or (
            n.endswith('conv.0.conv') and not n.startswith('layer1.'))
    }


def build(cfg):
    return MODELS.build(cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg)


@pytest.fixture(scope='module')
def teacher(tmp_path_factory, repo_root):
    """A width-0.25 teacher config (no ImageNet download) and a checkpoint
    with BatchNorm statistics from a few random batches."""
    folder = tmp_path_factory.mktemp('mbv2_teacher')
    config = folder / 'teacher.py'
    config.write_text(
        textwrap.dedent(f'''
        _base_ = ['{repo_root}/{PRETRAIN}']
        model = dict(backbone=dict(
            _delete_=True, type='MobileNetV2', widen_factor={WIDEN}))
    '''))
    torch.manual_seed(0)
    model = build(Config.fromfile(config).model)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model.extract_feat(torch.randn(4, 3, 128, 128))
    ckpt = folder / 'teacher.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, ckpt)
    return config, ckpt


@pytest.fixture(scope='module')
def search_config(tmp_path_factory, repo_root, cifar10_root, teacher):
    """search_mbv2_cifar10.py at width 0.25, batch 4, one epoch."""
    folder = tmp_path_factory.mktemp('mbv2_search')
    loader = (f"dict(batch_size=4, num_workers=0, persistent_workers=False, "
              f"dataset=dict(data_root='{cifar10_root}'))")
    config = folder / 'search.py'
    config.write_text(
        textwrap.dedent(f'''
        _base_ = ['{repo_root}/{SEARCH}']
        model = dict(
            backbone=dict(backbone=dict(widen_factor={WIDEN})),
            teacher='{teacher[0]}',
            teacher_checkpoint='{teacher[1]}')
        train_dataloader = {loader}
        val_dataloader = {loader}
        test_dataloader = val_dataloader
        train_cfg = dict(max_epochs=1, val_interval=1)
        default_hooks = dict(logger=dict(interval=1))
        env_cfg = dict(mp_cfg=dict(mp_start_method='fork'))
    '''))
    return config


@pytest.fixture(scope='module')
def searched(search_config, tmp_path_factory):
    """work_dir of one search epoch (5 bilevel iterations)."""
    from conftest import run_in_process  # the fixture is function-scoped
    work = tmp_path_factory.mktemp('mbv2_search_work')
    result = run_in_process(
        ['tools/train.py', search_config, '--work-dir', work])
    return work, result.output


def test_configs_keep_the_shared_settings():
    search = Config.fromfile(ROOT / SEARCH)
    pretrain = Config.fromfile(ROOT / PRETRAIN)
    finetune = Config.fromfile(ROOT / FINETUNE)
    assert search.model.input_shape == (3, 128, 128)
    # Named relative to the config file ({{ fileDirname }}), so absolute.
    assert Path(search.model.teacher).samefile(ROOT / PRETRAIN)
    assert search.train_cfg.mode == 'bilevel'
    # The teacher sees what the supernet sees.
    assert search.data_preprocessor == pretrain.data_preprocessor
    assert search.test_dataloader.dataset.pipeline == \
        pretrain.test_dataloader.dataset.pipeline
    assert finetune.model.backbone.type == 'QuantizedBackbone'
    assert finetune.model.backbone.policy == \
        'work_dirs/search_mbv2_cifar10/policy.json'
    assert finetune.model.backbone.backbone.init_cfg.type == 'Pretrained'


def test_supernet_searches_every_conv_but_the_stem():
    cfg = Config.fromfile(ROOT / SEARCH).model.backbone
    cfg.backbone.widen_factor = WIDEN
    supernet = build(cfg)
    mixed = {n: m for n, m in supernet.named_modules() if is_mixed_layer(m)}
    assert list(mixed) == mbv2_convs() and len(mixed) == 51
    assert not is_mixed_layer(supernet.conv1.conv)  # the stem stays FP
    assert {n for n, m in mixed.items() if m.signed} == signed_convs()
    depthwise = [n for n, m in mixed.items() if m.groups > 1]
    assert len(depthwise) == 17
    assert all(mixed[n].groups == mixed[n].in_channels for n in depthwise)


def test_attribution_map_has_4x4_pixels_at_128(teacher):
    cfg = Config.fromfile(teacher[0]).model
    model = build(cfg)
    state = torch.load(teacher[1], map_location='cpu')['state_dict']
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        for size, side in ((128, 4), (32, 1)):
            feats = model.backbone(torch.randn(2, 3, size, size))
            amap = attribution_map(feats, model.neck, model.head)
            assert amap.shape == (2, side, side)
    assert (amap >= 0).all()


def test_search_writes_policy_of_the_searched_convs(searched):
    work, output = searched
    for key in ('loss_attr', 'loss_complexity', 'arch_loss'):
        assert key in output, key
    policy = json.loads((work / 'policy.json').read_text())
    assert list(policy['layers']) == mbv2_convs()
    for bits in policy['layers'].values():
        assert bits['w_bits'] in (2, 3, 4, 6)
        assert bits['a_bits'] in (2, 3, 4, 6)
    assert policy['input_shape'] == [3, 128, 128]
    assert policy['bitops'] > 0
    assert (work / 'policy_epoch_1.json').is_file()


def test_finetune_config_applies_the_policy(searched, tmp_path):
    from gmpq_mm.engine.hooks.calibration_hook import check_pretrained_init
    work, _ = searched
    cfg = Config.fromfile(ROOT / FINETUNE)
    cfg.model.backbone.policy = str(work / 'policy.json')
    cfg.model.backbone.backbone.widen_factor = WIDEN
    # An FP ImageNet-shaped checkpoint of the same network, offline.
    fp_cfg = Config.fromfile(ROOT / FINETUNE).model
    fp_cfg.backbone = dict(type='MobileNetV2', widen_factor=WIDEN)
    fp = build(fp_cfg)
    fp_ckpt = tmp_path / 'fp_mbv2.pth'
    torch.save({'state_dict': fp.state_dict(), 'meta': {}}, fp_ckpt)
    cfg.model.backbone.backbone.init_cfg.checkpoint = str(fp_ckpt)

    model = build(cfg.model)
    quant = {
        n: m
        for n, m in model.backbone.named_modules() if is_quantized_layer(m)
    }
    assert list(quant) == mbv2_convs()
    policy = json.loads((work / 'policy.json').read_text())['layers']
    for name, m in quant.items():
        assert (m.w_bits, m.a_bits) == (policy[name]['w_bits'],
                                        policy[name]['a_bits']), name
    assert {n for n, m in quant.items() if m.signed} == signed_convs()
    check_pretrained_init(model)  # the FP weights fit the quantized net
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), mode='tensor')
    assert out.shape == (1, 1000)

    # The uniform baseline of the guide.
    cfg.model.backbone.update(policy=None, w_bits=4, a_bits=4)
    uniform = build(cfg.model)
    assert {(m.w_bits, m.a_bits)
            for m in uniform.backbone.modules()
            if is_quantized_layer(m)} == {(4, 4)}
