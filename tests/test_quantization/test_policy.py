"""Tests of gmpq_mm.quantization.policy (the JSON policy file)."""
import json
import os

import pytest
import torch
from torch import nn

from gmpq_mm.quantization import policy as policy_mod
from gmpq_mm.quantization.complexity import count_macs
from gmpq_mm.quantization.convert import (policy_from_model, select_layers,
                                          to_mixed_precision, to_quantized)
from gmpq_mm.quantization.policy import (load_policy, make_policy,
                                         policy_layers, save_policy,
                                         validate_policy)

LAYERS = {
    'layer1.0.conv1': (4, 3),
    'layer1.0.conv2': (2, 6),
    'layer2.0.downsample.0': (6, 4),
}


class Toy(nn.Module):

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 8, 3, stride=2, padding=1)  # 8x8 -> 4x4
        self.b = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.b(self.a(torch.relu(self.stem(x))))


def write(tmp_path, obj, name='policy.json'):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def good_policy():
    return make_policy(
        LAYERS,
        w_candidates=[2, 3, 4, 6],
        a_candidates=[2, 3, 4, 6],
        input_shape=(3, 32, 32),
        source='unit test')


def test_make_save_load_round_trip(tmp_path):
    policy = good_policy()
    assert policy['format'] == 'gmpq-policy' and policy['version'] == 1
    assert policy['mean_w_bits'] == pytest.approx(4.0)
    assert policy['mean_a_bits'] == pytest.approx(13 / 3)
    assert policy['bitops'] is None and policy['input_shape'] == [3, 32, 32]
    path = save_policy(policy, tmp_path / 'sub' / 'p.json')
    loaded = load_policy(path)
    assert loaded == policy
    assert list(loaded['layers']) == list(LAYERS)  # network order kept
    assert policy_layers(path) == LAYERS
    # the file is plain, readable JSON keyed by module name
    raw = json.loads(open(path).read())
    assert raw['layers']['layer1.0.conv2'] == {'w_bits': 2, 'a_bits': 6}
    assert os.listdir(tmp_path / 'sub') == ['p.json']  # no temporary left


def test_save_is_atomic(tmp_path, monkeypatch):
    path = save_policy(good_policy(), tmp_path / 'p.json')
    before = open(path).read()

    def crash(src, dst):
        raise OSError('disk full')

    monkeypatch.setattr(policy_mod.os, 'replace', crash)
    other = make_policy({'layer1.0.conv1': (2, 2)})
    with pytest.raises(OSError, match='disk full'):
        save_policy(other, path)
    assert open(path).read() == before
    assert os.listdir(tmp_path) == ['p.json']


def test_load_errors_name_file_and_layer(tmp_path):
    missing = str(tmp_path / 'nope.json')
    with pytest.raises(FileNotFoundError, match='nope.json'):
        load_policy(missing)

    bad_json = write(tmp_path, '{\n  "format": "gmpq-policy",\n  "layers": }')
    with pytest.raises(
            ValueError, match=r'policy.json: malformed JSON at '
            r'line 3 column'):
        load_policy(bad_json)

    for value in ('4', 3.5, 9, True, None):
        obj = good_policy()
        obj['layers']['layer1.0.conv2'] = {'w_bits': value, 'a_bits': 4}
        path = write(tmp_path, obj, 'bits.json')
        with pytest.raises(ValueError) as err:
            load_policy(path)
        msg = str(err.value)
        assert 'bits.json' in msg and 'layers[layer1.0.conv2]' in msg
        assert repr(value) in msg

    obj = good_policy()
    obj['layers']['layer1.0.conv1'] = {'w_bits': 5, 'a_bits': 4}
    with pytest.raises(
            ValueError,
            match=r'cand\.json: layers\[layer1\.0\.'
            r'conv1\] w_bits=5 is not among w_candidates'):
        load_policy(write(tmp_path, obj, 'cand.json'))

    obj = good_policy()
    obj['layers']['layer1.0.conv1'] = {'w_bits': 4}
    with pytest.raises(
            ValueError, match=r'layers\[layer1\.0\.conv1\].*a_bits'):
        load_policy(write(tmp_path, obj))


@pytest.mark.parametrize('change, message', [
    (lambda p: p.pop('format'), '"format" must be'),
    (lambda p: p.update(format='edmips'), 'edmips'),
    (lambda p: p.update(version=2), 'version'),
    (lambda p: p.update(layers=[]), '"layers" must be'),
    (lambda p: p.update(layers={}), '"layers" must be'),
    (lambda p: p.update(input_shape=[3, 'x', 32]), 'input_shape'),
    (lambda p: p.update(w_candidates=[2, 9]), 'w_candidates'),
])
def test_load_structure_errors(tmp_path, change, message):
    obj = good_policy()
    change(obj)
    path = write(tmp_path, obj, 'shape.json')
    with pytest.raises(ValueError, match=message) as err:
        load_policy(path)
    assert 'shape.json' in str(err.value)
    with pytest.raises(ValueError):
        load_policy(write(tmp_path, [obj], 'list.json'))


def test_validate_policy(tmp_path):
    path = save_policy(good_policy(), tmp_path / 'p.json')
    names = list(LAYERS)
    assert validate_policy(path, names) == LAYERS
    # returned in the model's order, not the file's
    assert list(validate_policy(path, names[::-1])) == names[::-1]

    with pytest.raises(
            ValueError, match=r'p\.json.*missing.*layer4\.1\.conv2'):
        validate_policy(path, names + ['layer4.1.conv2'])
    with pytest.raises(
            ValueError,
            match=r'p\.json.*layer2\.0\.downsample\.0.*not '
            r'quantized by the model'):
        validate_policy(path, names[:2])
    with pytest.raises(
            ValueError,
            match=r'p\.json.*layers\[layer1\.0\.conv2\] a_bits=6 '
            r'not in allowed \[2, 3, 4\]'):
        validate_policy(path, names, a_allowed=(2, 3, 4))
    with pytest.raises(ValueError, match=r'^my-run: .*w_bits=6'):
        validate_policy(
            good_policy(), names, w_allowed=(2, 4), source='my-run')


def test_policy_from_supernet_argmax():
    model = Toy()
    to_mixed_precision(model, (2, 3, 4, 6), (2, 4, 8))
    with torch.no_grad():
        model.a.alpha_w.copy_(torch.tensor([0.1, 0.9, 0.2, 0.3]))  # -> 3
        model.a.alpha_a.copy_(torch.tensor([0.0, 0.0, 1.0]))  # -> 8
        model.b.alpha_w.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # -> 6
        model.b.alpha_a.copy_(torch.tensor([2.0, 1.0, 0.0]))  # -> 2
    policy = policy_from_model(model, input_shape=(3, 8, 8), source='toy')
    assert policy_layers(policy) == {'a': (3, 8), 'b': (6, 2)}
    assert policy['w_candidates'] == [2, 3, 4, 6]
    assert policy['a_candidates'] == [2, 4, 8]
    macs_a, macs_b = 4 * 8 * 9 * 16, 8 * 8 * 16
    assert policy['bitops'] == macs_a * 24 + macs_b * 12
    assert policy['source'] == 'toy'

    # the policy builds a fixed-bit network with the same bits
    fixed = Toy()
    to_quantized(fixed, policy)
    assert fixed.a.bits == (3, 8) and fixed.b.bits == (6, 2)
    back = policy_from_model(fixed)
    assert policy_layers(back) == policy_layers(policy)
    assert back['w_candidates'] is None

    with pytest.raises(ValueError, match='no mixed-precision'):
        policy_from_model(Toy())


def test_policy_names_apply_across_resnets():
    """A policy searched on ResNet_CIFAR applies to the ImageNet ResNet."""
    backbones = pytest.importorskip('mmpretrain.models.backbones')
    cifar = backbones.ResNet_CIFAR(depth=18)
    to_mixed_precision(cifar, (2, 4), (2, 4))
    policy = policy_from_model(cifar)
    imagenet = backbones.ResNet(depth=18)
    names = select_layers(imagenet)
    assert validate_policy(policy, names, (2, 4), (2, 4)) == {
        n: (2, 2)
        for n in names
    }
    to_quantized(imagenet, policy)
    assert len(count_macs(imagenet, (3, 64, 64))) == 20


def test_policy_layer_stats_and_probabilities_checked():
    layers = {'a': (4, 4), 'b': (2, 3)}
    policy = make_policy(
        layers,
        w_candidates=[2, 4],
        a_candidates=[3, 4],
        layer_macs={
            'a': 10,
            'b': 20
        },
        layer_params={
            'a': 5,
            'b': 6
        },
        probabilities={'a': {
            'w': [0.25, 0.75],
            'a': [0.5, 0.5]
        }})
    assert policy['layer_macs'] == {'a': 10, 'b': 20}
    assert policy['probabilities']['a']['w'] == [0.25, 0.75]
    with pytest.raises(ValueError, match=r'layer_macs.*missing \[\'b\'\]'):
        make_policy(layers, layer_macs={'a': 10})
    with pytest.raises(ValueError, match=r'layer_params\[a\]'):
        make_policy(layers, layer_params={'a': -1, 'b': 2})
    with pytest.raises(ValueError, match=r"probabilities\[a\]\['w'\]"):
        make_policy(
            layers,
            w_candidates=[2, 4],
            a_candidates=[3, 4],
            probabilities={'a': {
                'w': [1.0],
                'a': [0.5, 0.5]
            }})
    with pytest.raises(ValueError, match='not in "layers"'):
        make_policy(layers, probabilities={'c': {'w': [1.0], 'a': [1.0]}})


def test_saved_policy_is_readable_by_others(tmp_path):
    """The atomic writer's temporary file is owner-only; the policy it
    leaves must have the mode a plain open() gives (umask applied)."""
    import os
    import stat
    path = tmp_path / 'p.json'
    old = os.umask(0o022)
    try:
        save_policy(make_policy({'a': (4, 4)}), path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ['p.json']
