"""GMPQSearchClassifier's build-time check of the attribution maps' size."""
import math
import warnings

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


@pytest.fixture(scope='module')
def teacher_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pth'
    torch.save({'state_dict': MODELS.build(TEACHER).state_dict()}, path)
    return str(path)


def _cfg(teacher_ckpt, **kw):
    """The tiny search model's config (32 px), ``kw`` on top."""
    cfg = dict(
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
        input_shape=(3, 32, 32))
    cfg.update(kw)
    return cfg


def build(teacher_ckpt, size):
    return MODELS.build(dict(_cfg(teacher_ckpt), input_shape=(3, size, size)))


def test_one_pixel_attribution_maps_are_warned_about(teacher_ckpt):
    # ResNet_CIFAR downsamples 8x: 8 px -> a 1x1 last stage.
    with pytest.warns(
            UserWarning,
            match=r'input_shape \(3, 8, 8\).*output\(s\) \[0\] '
            r'used for attribution are 1x1 feature maps'):
        build(teacher_ckpt, 8)


def test_multi_pixel_maps_build_quietly(teacher_ckpt):
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='.*1x1 feature maps')
        model = build(teacher_ckpt, 32)
    assert model.backbone.training  # the probe restored the mode


def test_teacher_checkpoint_of_another_width_is_refused(
        tmp_path, teacher_ckpt):
    wide = dict(
        TEACHER,
        backbone=dict(BACKBONE, base_channels=16),
        head=dict(HEAD, in_channels=128))
    path = tmp_path / 'wide.pth'
    torch.save({'state_dict': MODELS.build(wide).state_dict()}, path)
    with pytest.raises(
            ValueError,
            match=r'teacher checkpoint .*wide\.pth '
            r'does not match the teacher config.*shape mismatch '
            r'\(checkpoint vs model\): \[.backbone\.'):
        build(str(path), 32)
    # DDP-style 'module.' prefixes are stripped before the check.
    state = torch.load(teacher_ckpt, weights_only=True)['state_dict']
    prefixed = tmp_path / 'prefixed.pth'
    torch.save({'state_dict': {
        f'module.{k}': v
        for k, v in state.items()
    }}, prefixed)
    build(str(prefixed), 32)
    extra = tmp_path / 'extra.pth'
    torch.save({'state_dict': dict(state, stray=torch.zeros(1))}, extra)
    with pytest.raises(
            ValueError, match=r"1 unexpected keys, e\.g\. "
            r"\['stray'\]"):
        build(str(extra), 32)


@pytest.mark.parametrize('stages', [[1], [0, 3]])
def test_attribution_at_earlier_stages_trains(tmp_path, stages):
    """An earlier stage's map is differentiated through the later stages'
    quantized convs (differentiable once only): the loss must still
    back-propagate, into the alphas up to that stage."""
    from mmpretrain.structures import DataSample

    backbone = dict(BACKBONE, out_indices=(0, 1, 2, 3))
    teacher = dict(TEACHER, backbone=backbone)
    ckpt = tmp_path / 'teacher.pth'
    torch.save({'state_dict': MODELS.build(teacher).state_dict()}, ckpt)
    torch.manual_seed(0)
    model = MODELS.build(
        dict(
            type='GMPQSearchClassifier',
            backbone=dict(
                type='MixedPrecisionBackbone',
                backbone=backbone,
                w_bits=[2, 4],
                a_bits=[2, 4]),
            neck=dict(type='GlobalAveragePooling'),
            head=HEAD,
            teacher=teacher,
            teacher_checkpoint=str(ckpt),
            input_shape=(3, 16, 16),
            attribution_stages=stages))
    inputs = torch.randn(4, 3, 16, 16)
    samples = [DataSample().set_gt_label(i) for i in range(4)]
    losses = model.loss(inputs, samples)
    assert torch.isfinite(losses['loss_attr']) and losses['loss_attr'] > 0
    losses['loss_attr'].backward()  # raised RuntimeError before the fix
    name, layer = model.mixed_layers[0]  # layer1.0.conv1, before any stage
    assert name.startswith('layer1.0')
    assert layer.alpha_w.grad is not None
    assert layer.alpha_w.grad.abs().sum() > 0


def test_target_bitops_tolerance_needs_a_budget(teacher_ckpt):
    cfg = _cfg(teacher_ckpt, target_bitops_tolerance=0.02)
    with pytest.raises(ValueError, match='target_bitops_tolerance needs'):
        MODELS.build(cfg)
    model = MODELS.build(
        dict(cfg, target_bitops=None, target_bitops_tolerance=None))
    total = sum(model.layer_macs.values())
    # a band above everything reachable (all 4-bit = 16 x MACs) is named
    with pytest.raises(ValueError, match='above the largest reachable'):
        MODELS.build(dict(cfg, target_bitops=20 * total))
    # uniform alphas: the most likely policy is any; within the band it must
    # spend 98-100% of a budget midway between all-2-bit and all-4-bit
    model.target_bitops = 10 * total
    model.target_bitops_tolerance = 0.02
    policy = model.current_policy()
    assert 0.98 * 10 * total <= policy['bitops'] <= 10 * total


def test_budget_complexity_needs_target_bitops(teacher_ckpt):
    cfg = _cfg(
        teacher_ckpt,
        complexity_loss=dict(type='ComplexityLoss', mode='budget'))
    with pytest.raises(ValueError, match="mode='budget' needs target_bitops"):
        MODELS.build(cfg)
    total = sum(build(teacher_ckpt, 32).layer_macs.values())
    # budget all-2-bit (4 x MACs); uniform p costs 9 x MACs
    model = MODELS.build(dict(cfg, target_bitops=4 * total))
    losses = model.loss(torch.rand(2, 3, 32, 32), _samples(2))
    # E[b_w] = E[b_a] = 3 under uniform alphas: 9 / 4 - 1 = 1.25
    assert losses['loss_complexity'].item() == pytest.approx(
        3e-4 * 1.25**2, rel=1e-5)


def _samples(n):
    from mmpretrain.structures import DataSample
    return [DataSample().set_gt_label(i % 10) for i in range(n)]


def test_init_from_teacher_copies_every_teacher_weight(tmp_path):
    teacher = MODELS.build(TEACHER)
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_()
        for name, b in teacher.named_buffers():
            if name.endswith('running_var'):
                b.uniform_(0.5, 2.0)
    path = str(tmp_path / 'teacher.pth')
    torch.save({'state_dict': teacher.state_dict()}, path)
    cfg = _cfg(path)
    plain = MODELS.build(cfg)
    plain.init_weights()
    model = MODELS.build(dict(cfg, init_from_teacher=True))
    model.init_weights()
    own = model.state_dict()
    for key, value in teacher.state_dict().items():
        assert torch.equal(own[key], value), key
        if key.endswith('weight'):
            assert not torch.equal(plain.state_dict()[key], value), key
    # the alphas keep their init
    assert all(
        torch.equal(p, torch.full_like(p, 0.01))
        for p in model.arch_parameters())


def test_probability_stats_by_hand(teacher_ckpt):
    model = build(teacher_ckpt, 32)
    entropy, gap = model.probability_stats()
    assert entropy.item() == pytest.approx(1.0) and gap.item() == 0.0
    # one layer's weight probabilities -> (0.8, 0.2): H / log 2 = 0.7219,
    # gap 0.6; the other 2 * 19 - 1 distributions stay uniform
    with torch.no_grad():
        model.mixed_layers[0][1].alpha_w.copy_(
            torch.tensor([math.log(4.0), 0.0]))
    entropy, gap = model.probability_stats()
    h = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2)) / math.log(2)
    assert entropy.item() == pytest.approx((h + 37) / 38, rel=1e-6)
    assert gap.item() == pytest.approx(0.6 / 38, rel=1e-6)
    losses = model.loss(torch.rand(2, 3, 32, 32), _samples(2))
    assert losses['prob_entropy'].item() == pytest.approx(entropy.item())
    assert losses['prob_top2_gap'].item() == pytest.approx(gap.item())


def _fixed_model_size(policy):
    """Size of the fixed-bit classifier the finetune builds from policy."""
    from gmpq_mm.utils.report import model_complexity
    model = MODELS.build(
        dict(
            type='ImageClassifier',
            backbone=dict(
                type='QuantizedBackbone', backbone=BACKBONE, policy=policy),
            neck=dict(type='GlobalAveragePooling'),
            head=HEAD))
    return model_complexity(
        model, input_shape=(3, 32, 32), strict=True)['size_mb']


def test_size_budget_is_met_within_the_band(teacher_ckpt):
    from gmpq_mm.quantization.budget import policy_size_mb
    model = MODELS.build(_cfg(teacher_ckpt))
    lo, hi = (
        policy_size_mb(model.size_fixed_bits, model.layer_numels,
                       {n: (w, 2)
                        for n in model.layer_numels}) for w in (2, 4))
    budget = (lo + hi) / 2
    with torch.no_grad():  # a search that prefers 4-bit weights everywhere
        for _, m in model.mixed_layers:
            m.alpha_w.copy_(torch.tensor([0.0, 1.0]))
    model.target_size_mb, model.target_size_mb_tolerance = budget, 0.02
    policy = model.current_policy()
    assert 0.98 * budget <= policy['size_mb'] <= budget
    assert policy['size_budget_mb'] == budget
    # the finetune's fixed-bit model has exactly the size the search wrote
    assert _fixed_model_size(policy) == pytest.approx(
        policy['size_mb'], rel=1e-12)
    # with a BitOPs budget as well, both hold
    total = sum(model.layer_macs.values())
    model.target_bitops, model.target_bitops_tolerance = 7 * total, 0.1
    both = model.current_policy()
    assert 0.98 * budget <= both['size_mb'] <= budget
    assert 0.9 * 7 * total <= both['bitops'] <= 7 * total
    # built with them, the loss holds the size hinge, checked by hand:
    # uniform alphas, E[b_w] = 3 -> size midway = (lo + hi) / 2
    built = MODELS.build(
        _cfg(
            teacher_ckpt,
            target_size_mb=0.8 * budget,
            complexity_loss=dict(
                type='ComplexityLoss', mode='budget', loss_weight=2.0)))
    losses = built.loss(torch.rand(2, 3, 32, 32), _samples(2))
    expected = built.expected_size_mb().item()
    assert expected == pytest.approx(budget, rel=1e-6)
    assert losses['expected_size_mb'].item() == pytest.approx(expected)
    assert losses['loss_complexity'].item() == pytest.approx(
        2.0 * (1 / 0.8 - 1)**2, rel=1e-5)


@pytest.mark.parametrize('field', ['target_bitops', 'target_size_mb'])
@pytest.mark.parametrize('value', ['abc', [1, 2], True])
def test_budget_type_errors_name_the_field(teacher_ckpt, field, value):
    from gmpq_mm.quantization.budget import BudgetError
    with pytest.raises(
            BudgetError,
            match=f'^model.{field} must be a positive '
            'number such as .*, got') as err:
        MODELS.build(_cfg(teacher_ckpt, **{field: value}))
    assert '\n' not in str(err.value)
    with pytest.raises(BudgetError, match=f'model.{field}_tolerance must be'):
        MODELS.build(_cfg(teacher_ckpt, **{f'{field}_tolerance': True}))


def test_unreachable_size_budget_states_smallest(teacher_ckpt):
    with pytest.raises(
            ValueError,
            match=r'size budget 0\.01 MB is below the '
            r'smallest reachable 0\.051924 MB of these 19 layers'):
        MODELS.build(_cfg(teacher_ckpt, target_size_mb=0.01))


def test_target_preset_sets_candidates_and_is_recorded(teacher_ckpt):
    with pytest.warns(
            UserWarning,
            match=r"target 'int8_runtime' sets the "
            r'candidates w_bits=\[4, 8\] a_bits=\[8\]'):
        model = MODELS.build(_cfg(teacher_ckpt, target='int8_runtime'))
    assert model.w_candidates == (4, 8) and model.a_candidates == (8, )
    policy = model.current_policy()
    assert policy['target'] == 'int8_runtime'
    assert {e['a_bits'] for e in policy['layers'].values()} == {8}
    from gmpq_mm.quantization.targets import TargetError
    with pytest.raises(
            TargetError, match="model.target: unknown target 'tpu'"):
        MODELS.build(_cfg(teacher_ckpt, target='tpu'))
