"""Calibration numerics (by hand and against reference loops) and the
CalibrationHook's bookkeeping (skip on resume, checks of the FP init)."""
import json
import math
import types
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

# yapf: disable
from gmpq_mm.quantization.calibration import (activation_range,
                                              calibrate_model,
                                              collect_activation_stats,
                                              float_forward,
                                              histogram_threshold,
                                              kl_threshold,
                                              magnitude_histogram,
                                              mse_threshold, quantization_mse,
                                              release_threshold,
                                              weight_calibration)
# yapf: enable
from gmpq_mm.quantization.convert import to_quantized
from gmpq_mm.quantization.quantizers import activation_levels


# ----------------------------------------------------------- references --
def _ref_kl(bins, max_value, nq):
    """NVIDIA pytorch-quantization's _compute_amax_entropy, as a loop."""
    bins = np.asarray(bins, dtype=np.float64)
    best = (math.inf, None)
    for i in range(nq, len(bins) + 1):
        space = np.linspace(0, i, num=nq + 1)
        dig = np.digitize(range(i), space) - 1
        dig[bins[:i] == 0] = -1
        dens = np.zeros(nq)
        for idx, d in enumerate(dig):
            if d != -1:
                dens[d] += bins[idx]
        for key, val in Counter(dig).items():
            if key != -1:
                dens[key] /= val
        q = np.array([dens[d] if d != -1 else 0.0 for d in dig])
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        with np.errstate(divide='ignore', invalid='ignore'):
            p, q = p / p.sum(), q / q.sum()
            kl = np.where(p > 0, p * np.log(p / q), 0).sum()
        kl = math.inf if np.isnan(kl) else kl
        if kl < best[0]:
            best = (kl, i)
    return best[1] * max_value / len(bins)


def _ref_release(counts, max_value, bitwidth):
    """The released code's _compute_threshold on a given histogram."""
    hist = counts / counts.sum()
    cs = np.cumsum(hist)
    width = max_value / len(counts)
    n = 2**(bitwidth - 1)
    if n + 1 > len(counts):
        return max_value
    th, d = [], []
    for i in range(n + 1, len(counts) + 1):
        th.append((i + 0.5) * width)
        p = cs.copy()
        p[i - 1:] = 1
        pi = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, i), p[:i])
        qi = np.interp(np.linspace(0, 1, i), np.linspace(0, 1, n), pi)
        q = p.copy()
        q[:i] = qi
        with np.errstate(all='ignore'):
            t = (cs - q) * np.log2(cs / q)
        t[cs == q] = 0
        s = t.sum()
        d.append(math.inf if np.isnan(s) else s)
    return th[int(np.argmin(d))]


# ------------------------------------------------------------ thresholds --
def test_kl_threshold_by_hand():
    # hist [8, 4, 0, 1] over [0, 4], 2 quantized bins. Kept i=2: P=[8,5]/13,
    # Q=[8,4]/12, KL=0.00578; i=3: Q has 0 where P has the folded mass:
    # inf; i=4: Q=[6,6,0,1]/13, KL=0.0523. Best i=2 -> threshold 2.0.
    assert kl_threshold(torch.tensor([8., 4., 0., 1.]), 4.0, 2) == 2.0
    # hist [4, 2, 1, 1]: KL(i=2)=0.0589, KL(i=3)=0.0822, KL(i=4)=0.0425.
    assert kl_threshold(torch.tensor([4., 2., 1., 1.]), 4.0, 2) == 4.0
    # Fewer bins than quantized values: nothing to clip.
    assert kl_threshold(torch.tensor([1., 1.]), 3.0, 4) == 3.0
    assert kl_threshold(torch.zeros(8), 3.0, 2) == 0.0


def test_kl_threshold_matches_reference_loop():
    rng = np.random.RandomState(0)
    for _ in range(25):
        n, nq = rng.randint(5, 60), rng.randint(1, 9)
        h = rng.poisson(rng.rand() * 5, n) * (rng.rand(n) > 0.3)
        if h.sum() == 0:
            continue
        got = kl_threshold(torch.tensor(h, dtype=torch.float64), 3.0, nq)
        assert got == pytest.approx(_ref_kl(h, 3.0, nq), abs=1e-12)


def test_kl_threshold_clips_gaussian_outliers_int8():
    # |N(0,1)| with TensorRT's 128 bins: the bulk is kept, the far tail
    # (a few outliers at 40 sigma) is clipped.
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200000, generator=gen), torch.full((5, ), 40.)])
    hist = magnitude_histogram(x, 40.0, 2048)
    t = kl_threshold(hist, 40.0, 128)
    assert 2.5 < t < 8.0


def test_release_threshold_matches_the_released_code():
    rng = np.random.RandomState(3)
    for _ in range(20):
        n, b = rng.randint(3, 120), rng.randint(1, 6)
        h = rng.poisson(rng.rand() * 6, n).astype(float)
        h[0] += 1
        got = release_threshold(torch.tensor(h), 2.0, b)
        assert got == pytest.approx(_ref_release(h, 2.0, b), abs=1e-9)


def test_mse_threshold_is_the_best_clip():
    torch.manual_seed(1)
    x = torch.distributions.Laplace(0., 1.).sample((20000, )).clamp_min(0)
    top = float(x.max())
    hist = magnitude_histogram(x, top, 512, signed=False)
    for bits in (2, 4):
        levels = activation_levels(bits)
        t = mse_threshold(hist, top, levels)
        grid = np.linspace(0.05, top, 150)
        best = min(quantization_mse(x, float(g), levels) for g in grid)
        assert quantization_mse(x, t, levels) <= best * 1.02


def test_mse_beats_spec_threshold_on_heavy_tails():
    """Evidence for the options: held-out quantization MSE of post-ReLU
    Laplace activations. TensorRT's KL (made for 8 bits) collapses at 2-3
    bits; the released code's threshold is sane but clips harder than the
    MSE optimum."""
    torch.manual_seed(0)
    lap = torch.distributions.Laplace(0., 1.)
    cal, held_out = lap.sample((100000, )).clamp_min(0), \
        lap.sample((100000, )).clamp_min(0)
    top = float(cal.max())
    hist = magnitude_histogram(cal, top, 2048, signed=False)
    for bits in (2, 3):
        levels = activation_levels(bits)
        err = {
            m:
            quantization_mse(
                held_out,
                activation_range(hist, top, bits, method=m, cap=None), levels)
            for m in ('kl', 'release', 'mse')
        }
        assert err['mse'] < err['release'] < err['kl']
        assert activation_range(hist, top, bits, method='kl', cap=None) \
            < 0.05 * top


def test_activation_range_rule():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=gen).clamp_min(0) * 4
    top = float(x.max())
    hist = magnitude_histogram(x, top, 512, signed=False)
    thr = histogram_threshold(hist, top, 'release', 3)
    # b < 5: min(6, max, threshold); b >= 5: min(6, max).
    assert activation_range(hist, top, 3) == pytest.approx(min(6, top, thr))
    assert activation_range(hist, top, 6) == pytest.approx(min(6, top))
    assert activation_range(hist, top, 6, cap=None) == pytest.approx(top)
    assert activation_range(hist, top, 3, method='max') == min(6, top)
    with pytest.raises(ValueError, match='not one of'):
        activation_range(hist, top, 3, method='entropy')


def test_weight_calibration_rule():
    w = torch.randn(8, 4, 3, 3)
    assert weight_calibration(w, 6) is None  # max|W|, kept dynamic
    assert weight_calibration(w, 32) is None
    assert weight_calibration(w, 3, method='max') is None
    t = weight_calibration(w, 3, bins=256)
    assert t.dim() == 0 and 0 < float(t)
    h = magnitude_histogram(w, float(w.abs().max()), 256)
    assert float(t) == pytest.approx(
        release_threshold(h, float(w.abs().max()), 3), rel=1e-6)
    per = weight_calibration(w, 2, bins=64, per_channel=True)
    assert per.shape == (8, )


# --------------------------------------------------------------- networks --
class _Tiny(nn.Module):

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv(x))
        return self.fc(x.mean((2, 3)))


def _tiny(bits=(3, 2)):
    torch.manual_seed(0)
    model = _Tiny()
    return to_quantized(model, {'conv': bits, 'fc': (4, 6)})


def test_float_forward_turns_quantizers_off():
    model = _tiny()
    x = torch.randn(2, 3, 8, 8)
    fp = _Tiny()
    fp.load_state_dict({
        k: v
        for k, v in model.state_dict().items()
        if not k.endswith(('act_range', 'w_threshold'))
    })
    with float_forward(model):
        assert torch.allclose(model(x), fp(x), atol=1e-6)
    assert not torch.allclose(model(x), fp(x), atol=1e-3)
    assert 'forward' not in vars(model.conv)


def test_calibrate_model_uses_fp_inputs_and_the_rule():
    model = _tiny()
    batches = [torch.randn(4, 3, 8, 8) * 3 for _ in range(2)]
    seen = []
    handle = model.conv.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].detach().clone()))
    with float_forward(model), torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    x = torch.cat([s.reshape(-1) for s in seen])
    top = float(x.clamp_min(0).max())
    model.train()
    rows = calibrate_model(model, batches, bins=128)
    assert model.training and model.conv.training  # flags restored
    hist = magnitude_histogram(x, top, 128, signed=False)
    expected = activation_range(hist, top, 2, method='release')
    assert float(model.conv.act_range.detach()) == pytest.approx(
        expected, rel=1e-6)
    assert rows['conv']['act_max'] == pytest.approx(top)
    # 3-bit weights: a calibrated threshold; fc at 4 bits too.
    assert model.conv.w_threshold.numel() == 1
    assert rows['conv']['w_threshold'] == pytest.approx(
        [float(model.conv.w_threshold.detach())])
    assert model.fc.w_threshold.numel() == 1
    # 6-bit activations of fc: min(6, max|x|).
    assert rows['fc']['act_range'] <= 6.0


def test_statistics_reduce_to_the_same_ranges():
    """Two "ranks" with different batches whose reduced statistics are
    those of both batches: every rank gets the single-process result."""
    a, b = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8) * 2
    both = collect_activation_stats(_tiny(), [a, b], bins=64)
    st_a = collect_activation_stats(_tiny(), [a], bins=64)
    st_b = collect_activation_stats(_tiny(), [b], bins=64)
    top = torch.tensor([max(st_a[n]['max'], st_b[n]['max']) for n in st_a],
                       dtype=torch.float64)

    def reduce_max(t):
        t.copy_(top)

    ranks = []
    for mine, other in ((a, b), (b, a)):
        # second pass: this rank's histogram plus the other rank's, both
        # over the reduced maxima
        def reduce_sum(t, other=other):
            model = _tiny()
            for i, name in enumerate(both):
                layer = dict(model.named_modules())[name]
                seen = []
                h = layer.register_forward_pre_hook(
                    lambda m, args: seen.append(args[0]))
                with float_forward(model), torch.no_grad():
                    model(other)
                h.remove()
                t[i] += magnitude_histogram(
                    seen[0], float(top[i]), 64, signed=False)

        ranks.append(
            collect_activation_stats(
                _tiny(), [mine],
                bins=64,
                reduce_max=reduce_max,
                reduce_sum=reduce_sum))
    for name in both:
        for st in ranks:
            assert st[name]['max'] == both[name]['max']
            assert torch.equal(st[name]['hist'], both[name]['hist'])


# ------------------------------------------------------------------ hook --
def _runner(model, work_dir, batches, resume=False):
    logs = []
    logger = types.SimpleNamespace(info=logs.append)
    return types.SimpleNamespace(
        model=model,
        work_dir=str(work_dir),
        logger=logger,
        _resume=resume,
        train_dataloader=[dict(inputs=b, data_samples=None) for b in batches],
        logs=logs)


class _Classifier(nn.Module):
    """What the hook needs of an mmpretrain classifier."""

    def __init__(self):
        super().__init__()
        self.net = _tiny()
        self.data_preprocessor = lambda data, training: data

    def forward(self, x, mode='tensor'):
        assert mode == 'tensor'
        return self.net(x)


def test_hook_calibrates_records_and_skips(tmp_path):
    from gmpq_mm.engine.hooks import CalibrationHook
    model = _Classifier()
    runner = _runner(model, tmp_path, [torch.randn(2, 3, 8, 8)] * 3)
    hook = CalibrationHook(num_batches=2, bins=64)
    hook.before_train(runner)
    assert float(model.net.conv.act_range.detach()) != 6.0
    saved = json.loads((tmp_path / 'calibration.json').read_text())
    assert saved['images'] == 4 and saved['world_size'] == 1
    assert saved['layers']['net.conv']['act_range'] == pytest.approx(
        float(model.net.conv.act_range.detach()))
    assert len(saved['rank_digests']) == 1
    ckpt = {'meta': {}}
    hook.before_save_checkpoint(runner, ckpt)
    assert ckpt['meta']['gmpq_calibration']['method'] == 'release'

    # A run loading that checkpoint (load_from) keeps its ranges.
    other = _Classifier()
    runner2 = _runner(other, tmp_path, [torch.randn(2, 3, 8, 8)])
    hook2 = CalibrationHook(bins=64, save_file=None)
    hook2.after_load_checkpoint(runner2, ckpt)
    hook2.before_train(runner2)
    assert float(other.net.conv.act_range.detach()) == 6.0
    assert 'skipped' in runner2.logs[-1]
    # ... and passes the record on to its own checkpoints.
    ckpt2 = {'meta': {}}
    hook2.before_save_checkpoint(runner2, ckpt2)
    assert ckpt2['meta']['gmpq_calibration'] == \
        ckpt['meta']['gmpq_calibration']

    # Resuming never recalibrates, even from a checkpoint without the flag.
    runner3 = _runner(
        _Classifier(), tmp_path, [torch.randn(2, 3, 8, 8)], resume=True)
    hook3 = CalibrationHook(bins=64, save_file=None)
    hook3.after_load_checkpoint(runner3, {'meta': {}})
    hook3.before_train(runner3)
    assert float(runner3.model.net.conv.act_range.detach()) == 6.0


def test_hook_rejects_bad_arguments():
    from gmpq_mm.engine.hooks import CalibrationHook
    with pytest.raises(ValueError, match='not one of'):
        CalibrationHook(method='entropy')
    with pytest.raises(ValueError, match='num_batches'):
        CalibrationHook(num_batches=0)


def _tiny_resnet_cfg(checkpoint, base=8):
    return dict(
        type='ImageClassifier',
        backbone=dict(
            type='QuantizedBackbone',
            backbone=dict(
                type='ResNet',
                depth=18,
                stem_channels=base,
                base_channels=base,
                out_indices=(3, ),
                init_cfg=dict(
                    type='Pretrained',
                    checkpoint=str(checkpoint),
                    prefix='backbone')),
            w_bits=4,
            a_bits=4),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=3, in_channels=base * 8))


def _fp_checkpoint(path, base=8, depth=18):
    from mmengine.registry import init_default_scope

    from gmpq_mm.registry import MODELS
    init_default_scope('mmpretrain')
    torch.manual_seed(1)
    fp = MODELS.build(
        dict(
            type='ImageClassifier',
            backbone=dict(
                type='ResNet',
                depth=depth,
                stem_channels=base,
                base_channels=base,
                out_indices=(3, )),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(
                type='LinearClsHead',
                num_classes=3,
                in_channels=base * (32 if depth >= 50 else 8))))
    for p in fp.parameters():  # not an init a fresh model could reproduce
        p.data.uniform_(-1, 1)
    torch.save({'state_dict': fp.state_dict(), 'meta': {}}, path)
    return fp


def test_pretrained_init_loads_fp_weights_into_quantized_backbone(tmp_path):
    """The inner backbone's init_cfg (Pretrained, prefix 'backbone') fills
    the quantized network: the FP keys 'backbone.layer1.0.conv1.weight'
    land on the same names."""
    from gmpq_mm.engine.hooks.calibration_hook import check_pretrained_init
    from gmpq_mm.registry import MODELS
    fp = _fp_checkpoint(tmp_path / 'fp.pth')
    model = MODELS.build(_tiny_resnet_cfg(tmp_path / 'fp.pth'))
    model.init_weights()
    check_pretrained_init(model)
    ref = fp.state_dict()
    own = model.state_dict()
    names = [k for k in ref if k.startswith('backbone.')]
    assert 'backbone.layer1.0.conv1.weight' in names
    for key in names:
        assert torch.equal(own[key], ref[key]), key
    # The quantizer state stays at its defaults.
    assert float(own['backbone.layer1.0.conv1.act_range']) == 6.0


def test_pretrained_init_of_another_architecture_is_an_error(tmp_path):
    from gmpq_mm.engine.hooks.calibration_hook import check_pretrained_init
    from gmpq_mm.registry import MODELS
    _fp_checkpoint(tmp_path / 'wide.pth', base=16)
    model = MODELS.build(_tiny_resnet_cfg(tmp_path / 'wide.pth'))
    model.init_weights()  # mmengine only warns
    with pytest.raises(ValueError, match='wide.pth.*shape mismatch'):
        check_pretrained_init(model)
    _fp_checkpoint(tmp_path / 'r50.pth', base=8, depth=50)
    model = MODELS.build(_tiny_resnet_cfg(tmp_path / 'r50.pth'))
    with pytest.raises(ValueError, match=r'r50\.pth.*unexpected'):
        check_pretrained_init(model)
