"""The packed low-bit artifact: bit packing, exact reload, size, checks."""
import json
import struct

import pytest
import torch
from torch import nn

from gmpq_mm.quantization.convert import select_layers, to_quantized
from gmpq_mm.quantization.export import (ArtifactError, export_quantized,
                                         load_artifact, pack_bits,
                                         packed_nbytes, save_artifact,
                                         unpack_bits)
from gmpq_mm.quantization.layers import is_quantized_layer


@pytest.mark.parametrize('bits', range(1, 9))
def test_pack_roundtrip_every_width(bits):
    gen = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 9, 1001):
        codes = torch.randint(0, 2**bits, (n, ), generator=gen)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8
        assert packed.numel() == packed_nbytes(n, bits) == (n * bits + 7) // 8
        assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_layout_by_hand():
    # 4 bits: two codes per byte, the first in the low nibble.
    assert pack_bits(torch.tensor([1, 2, 3, 4]), 4).tolist() == [0x21, 0x43]
    # 2 bits: four per byte.
    assert pack_bits(torch.tensor([1, 2, 3, 0, 3]),
                     2).tolist() == [0b00111001, 0b11]
    # 3 bits: a stream, LSB first: 5=101, 6=011 (LSB first), 1=100 ...
    assert pack_bits(torch.tensor([5, 6, 1]), 3).tolist() == [0b01110101, 0b0]
    with pytest.raises(ValueError, match=r'\[0, 15\]'):
        pack_bits(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match='cannot hold'):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 9)


class _Net(nn.Module):

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b = nn.Conv2d(8, 6, 3, padding=1, groups=2)
        self.c = nn.Conv2d(6, 5, 1)
        self.d = nn.Conv2d(5, 7, 3, padding=1)
        self.fc = nn.Linear(7, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.a(x))
        x = self.b(x)  # signed input for c
        x = torch.relu(self.c(x))
        x = torch.relu(self.d(x))
        return self.fc(x.mean((2, 3)))


def _quantized_net():
    torch.manual_seed(0)
    net = _Net()
    net.bn.running_mean.uniform_(-0.1, 0.1)
    policy = {
        'a': (2, 3),
        'b': (3, 4),
        'c': (5, 2),
        'd': (32, 4),
        'fc': (8, 32)
    }
    to_quantized(net, policy, signed={'c': True})
    # Some calibrated thresholds (clipping), one per-channel, some max|W|.
    net.a.calibrate_weight(float(net.a.weight.detach().abs().max()) * 0.6)
    net.b.calibrate_weight(net.b.weight.detach().flatten(1).abs().amax(1) *
                           0.8)
    for m in net.modules():
        if is_quantized_layer(m):
            m.calibrate_activation(1.7)
    return net.eval()


def test_export_reload_reproduces_logits(tmp_path):
    net = _quantized_net()
    x = torch.randn(3, 3, 9, 9)
    with torch.no_grad():
        ref = net(x)
    path = tmp_path / 'net.safetensors'
    info = save_artifact(
        path,
        net,
        config={'arch': '_Net'},
        policy={'note': 'by hand'},
        extra={'k': 1})
    assert info['packed_layers'] == 4 and info['bytes'] == path.stat().st_size
    state, meta = load_artifact(path)
    assert meta['config'] == {'arch': '_Net'}
    assert meta['policy'] == {'note': 'by hand'} and meta['extra'] == {'k': 1}
    assert meta['layers']['c'] == dict(
        w_bits=5,
        a_bits=2,
        signed=True,
        per_channel=False,
        kind='conv',
        shape=[5, 6, 1, 1],
        act_levels=1,
        levels=15)
    rebuilt = _Net()
    to_quantized(
        rebuilt, {
            n: tuple(v[k] for k in ('w_bits', 'a_bits'))
            for n, v in meta['layers'].items()
        },
        signed={
            n: v['signed']
            for n, v in meta['layers'].items()
        })
    rebuilt.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = rebuilt.eval()(x)
    assert float((out - ref).abs().max()) <= 1e-5
    assert torch.equal(out, ref)  # in fact bit-exact


def test_export_layout():
    net = _quantized_net()
    tensors, meta = export_quantized(net)
    # 2-bit a: 8*8*9 = 576 codes -> 144 bytes; FP-bit d keeps its weight.
    assert tensors['a.weight.packed'].dtype == torch.uint8
    assert tensors['a.weight.packed'].numel() == 576 * 2 // 8
    assert 'a.weight' not in tensors and 'a.w_threshold' not in tensors
    assert tensors['b.weight.threshold'].shape == (6, )  # per channel
    assert torch.allclose(tensors['b.weight.scale'] * 3,
                          tensors['b.weight.threshold'])
    assert tensors['d.weight'].dtype == torch.float32
    assert 'fc.weight.packed' in tensors and 'bn.running_var' in tensors
    assert float(tensors['c.act_range']) == pytest.approx(1.7)
    assert json.loads(meta['layers'])['d']['w_bits'] == 32


def test_artifact_size_matches_model_size_resnet18(tmp_path):
    """File size of a mixed-precision ResNet-18 vs the policy's model size
    (params at their bits): within 2 %."""
    from mmengine.registry import init_default_scope

    from gmpq_mm.registry import MODELS
    from gmpq_mm.utils.report import model_complexity
    init_default_scope('mmpretrain')
    backbone = dict(type='ResNet', depth=18, out_indices=(3, ))
    names = select_layers(MODELS.build(backbone))
    cycle = [(4, 4), (3, 4), (2, 3), (6, 4), (4, 6)]
    policy = {n: cycle[i % len(cycle)] for i, n in enumerate(names)}
    model = MODELS.build(
        dict(
            type='ImageClassifier',
            backbone=dict(
                type='QuantizedBackbone',
                backbone=backbone,
                policy={
                    'format': 'gmpq-policy',
                    'version': 1,
                    'layers': {
                        n: {
                            'w_bits': w,
                            'a_bits': a
                        }
                        for n, (w, a) in policy.items()
                    }
                },
                signed=False),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=1000,
                      in_channels=512)))
    report = model_complexity(model, input_shape=(3, 32, 32), strict=True)
    info = save_artifact(tmp_path / 'r18.safetensors', model.eval())
    ratio = info['bytes'] / 1e6 / report['size_mb']
    assert 1.0 <= ratio < 1.02, (info['bytes'], report['size_mb'])


@pytest.fixture
def artifact(tmp_path):
    path = tmp_path / 'art.safetensors'
    save_artifact(path, _quantized_net())
    return path


def test_truncated_artifact_is_rejected(artifact):
    data = artifact.read_bytes()
    for cut in (5, 100, len(data) - 10):
        artifact.write_bytes(data[:cut])
        with pytest.raises(
                ArtifactError, match=r'art\.safetensors.*truncated'):
            load_artifact(artifact)
    artifact.write_bytes(data + b'\0')
    with pytest.raises(ArtifactError, match=r'art\.safetensors.*unexpected'):
        load_artifact(artifact)


def test_altered_tensor_is_rejected(artifact):
    data = bytearray(artifact.read_bytes())
    data[-3] ^= 0x10  # a byte of the last tensor
    artifact.write_bytes(bytes(data))
    with pytest.raises(
            ArtifactError,
            match=r'art\.safetensors: checksum mismatch for '
            r'tensor'):
        load_artifact(artifact)


def test_altered_metadata_is_rejected(artifact):
    data = artifact.read_bytes()
    (n, ) = struct.unpack('<Q', data[:8])
    old = b'{\\"a\\": {\\"w_bits\\": 2'  # layers JSON inside the header
    assert data[8:8 + n].count(old) == 1
    artifact.write_bytes(data.replace(old, old[:-1] + b'3'))
    with pytest.raises(
            ArtifactError, match=r'art\.safetensors: metadata checksum'):
        load_artifact(artifact)


def test_missing_artifact(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.safetensors'):
        load_artifact(tmp_path / 'nope.safetensors')
    (tmp_path / 'x.safetensors').write_bytes(b'\x05' + b'\0' * 20)
    with pytest.raises(ArtifactError, match='x.safetensors'):
        load_artifact(tmp_path / 'x.safetensors')


def _dead_pid():
    """A pid no process has (for a leftover of a killed writer)."""
    import os
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def test_artifact_honours_umask_and_removes_leftovers(tmp_path):
    """The artifact gets the mode a plain open() gives (0644 under umask
    022, not mkstemp's 0600), and the hidden file a killed writer left
    beside it is removed by the next write to that path."""
    import os
    import stat
    path = tmp_path / 'net.safetensors'
    stale = tmp_path / f'.net.safetensors.{_dead_pid()}.abc123.tmp'
    stale.write_bytes(b'x' * 1000)
    other = tmp_path / '.other.safetensors.1.abc.tmp'  # another file's
    other.write_bytes(b'y')
    old = os.umask(0o022)
    try:
        save_artifact(path, _quantized_net())
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o027)
        save_artifact(path, _quantized_net())
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(old)
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        '.other.safetensors.1.abc.tmp', 'net.safetensors'
    ]
