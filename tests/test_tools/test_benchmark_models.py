"""gmpq_mm.apis.benchmark_models: the one builder of the benchmarks'
networks (the configs' ResNet-18 through the registered converters)."""
import pytest
import torch

from gmpq_mm.apis.benchmark_models import (backbone_cfg, build_classifier,
                                           build_search_model, classifier_cfg)
from gmpq_mm.quantization.layers import MixedPrecisionConv2d, QuantizedConv2d

# ResNet-18: 16 block convs + 3 downsample convs; the stem stays FP.
CONVS_BUT_STEM = 19


def _layers(model, cls):
    return {
        name: m
        for name, m in model.backbone.named_modules() if isinstance(m, cls)
    }


def test_configs_name_the_registered_types():
    assert backbone_cfg('fp', 'cifar')['type'] == 'ResNet_CIFAR'
    assert backbone_cfg('fp', 'imagenet')['type'] == 'ResNet'
    w4a4 = backbone_cfg('w4a4', 'imagenet', signed=False)
    assert (w4a4['type'], w4a4['w_bits'], w4a4['a_bits'],
            w4a4['signed']) == ('QuantizedBackbone', 4, 4, False)
    policy = backbone_cfg('w4a4', policy={'layer1.0.conv1': [2, 8]})
    assert 'w_bits' not in policy and policy['policy']
    supernet = backbone_cfg('supernet')
    assert supernet['type'] == 'MixedPrecisionBackbone'
    assert supernet['w_bits'] == supernet['a_bits'] == [2, 3, 4, 6]
    cfg = classifier_cfg('fp', 'cifar', 10, preprocessor=True)
    assert cfg['data_preprocessor']['mean'] == [125.3, 123.0, 113.9]
    assert 'data_preprocessor' not in classifier_cfg()
    with pytest.raises(ValueError, match='kind must be one of'):
        backbone_cfg('w3a3')
    with pytest.raises(ValueError, match="stem must be one of.*'mnist'"):
        classifier_cfg('fp', 'mnist')


def test_kinds_swap_every_conv_but_the_stem():
    fp = build_classifier('fp')
    assert not _layers(fp, (MixedPrecisionConv2d, QuantizedConv2d))
    w4a4 = build_classifier('w4a4')
    quantized = _layers(w4a4, QuantizedConv2d)
    assert len(quantized) == CONVS_BUT_STEM and 'conv1' not in quantized
    assert 'layer2.0.downsample.0' in quantized
    assert {(m.w_bits, m.a_bits) for m in quantized.values()} == {(4, 4)}
    supernet = build_classifier('supernet')
    mixed = _layers(supernet, MixedPrecisionConv2d)
    assert sorted(mixed) == sorted(quantized)
    assert tuple(mixed['layer1.0.conv1'].w_candidates) == (2, 3, 4, 6)
    # Same names and shapes as the FP network: its weights load unchanged.
    supernet.load_state_dict(fp.state_dict(), strict=False)
    x = torch.randn(2, 3, 32, 32)
    assert fp(x, mode='tensor').shape == (2, 10)
    imagenet = build_classifier('w4a4', 'imagenet', 1000, signed=False)
    assert imagenet(
        torch.randn(1, 3, 64, 64), mode='tensor').shape == (1, 1000)


def test_search_model_reads_the_teacher_it_is_given(tmp_path):
    torch.manual_seed(0)
    fp = build_classifier('fp', preprocessor=True)
    search = build_search_model('cifar', 10, teacher_state=fp.state_dict())
    assert type(search).__name__ == 'GMPQSearchClassifier'
    assert search.training
    teacher = search.teacher.state_dict()
    for key, value in fp.state_dict().items():
        if key in teacher:
            assert torch.equal(teacher[key], value), key
    assert torch.equal(teacher['backbone.conv1.weight'],
                       fp.state_dict()['backbone.conv1.weight'])
    assert len(_layers(search, MixedPrecisionConv2d)) == CONVS_BUT_STEM
