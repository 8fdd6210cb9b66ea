"""The deployable low-bit artifact: packed integer weights in safetensors.

Layout of a ``.safetensors`` artifact written by :func:`save_artifact`
(no pickle anywhere; any safetensors reader can open it):

* for every fixed-bit layer ``L`` with ``w_bits < 32`` (names as in the
  model's ``state_dict``):

  - ``L.weight.packed``: ``uint8``, the integer codes ``c`` in
    ``[-n, n]`` (``n = 2^(b-1) - 1``) stored offset by ``+n`` (so in
    ``[0, 2^b - 2]``) and bit-packed at ``b`` bits each, least significant
    bit first, in ``weight.flatten()`` order: four 2-bit codes, two 4-bit
    codes or 8/3 3-bit codes per byte;
  - ``L.weight.threshold``: ``float32``, the clipping threshold ``T``
    (0-d, or one per output channel);
  - ``L.weight.scale``: ``float32``, ``T / n``: ``W = c * scale`` for an
    integer kernel;
  - ``L.act_range`` (as in the state_dict): the activation range ``r``;
  - ``L.bias`` if any, FP;

* every other ``state_dict`` entry (stem conv, BatchNorm parameters and
  statistics, classifier, FP-bit layers) as it is;

* metadata (all strings): ``format`` (``gmpq-artifact``), ``version``,
  ``layers`` (JSON: per quantized layer ``w_bits``, ``a_bits``, ``signed``,
  ``per_channel``, ``shape``, ``levels``, ``act_levels``), ``config`` (the
  model config, JSON), ``policy`` (JSON), ``extra`` (JSON),
  ``tensors_sha256`` (JSON: name -> sha256 of the tensor's bytes) and
  ``metadata_sha256`` (sha256 of all the other metadata), so that a
  truncated, altered or mixed-up file is rejected by :func:`load_artifact`
  with an error that names the file and what is wrong.

:func:`load_artifact` returns a ``state_dict`` in which each packed weight
is dequantized exactly the way the fixed-bit layer computes its quantized
weight (``(c * (1 / n)) * T``) and ``w_threshold`` is set to ``T``, so the
rebuilt fake-quantized network reproduces the exported one's outputs.

Pure PyTorch + safetensors: nothing from mmengine / mmpretrain is imported.
"""
import hashlib
import json
import os
import os.path as osp
import struct
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save_file
from torch import Tensor, nn

from .atomic_file import atomic_path
from .layers import is_quantized_layer
from .quantizers import (FP_BITS, activation_levels, quantize_weight,
                         weight_levels, weight_threshold)

__all__ = [
    'ARTIFACT_FORMAT', 'ARTIFACT_VERSION', 'ArtifactError', 'pack_bits',
    'unpack_bits', 'packed_nbytes', 'weight_codes', 'dequantize_codes',
    'export_quantized', 'save_artifact', 'load_artifact', 'read_metadata'
]

ARTIFACT_FORMAT = 'gmpq-artifact'
ARTIFACT_VERSION = 1
PACKED = '.weight.packed'
THRESHOLD = '.weight.threshold'
SCALE = '.weight.scale'
_JSON_KEYS = ('layers', 'config', 'policy', 'extra', 'tensors_sha256')
PathLike = Union[str, os.PathLike]


class ArtifactError(ValueError):
    """A malformed, truncated or altered artifact (message names the file)."""


# ---------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------
def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take once packed."""
    return (int(numel) * int(bits) + 7) // 8


def _check_pack_bits(bits: int) -> int:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f'packing needs 1..8 bits, got {bits!r}')
    return bits


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned integer codes (each ``< 2^bits``) into ``uint8``.

    Code ``k`` occupies bits ``k*bits .. k*bits + bits - 1`` of the stream,
    least significant first; the last byte is zero-padded.

    Args:
        codes (Tensor): Integer tensor (any shape; flattened).
        bits (int): 1..8.

    Returns:
        Tensor: ``uint8`` of ``packed_nbytes(codes.numel(), bits)`` bytes.
    """
    bits = _check_pack_bits(bits)
    flat = codes.detach().reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f'codes must lie in [0, {2**bits - 1}] to pack at '
                         f'{bits} bits, got [{int(flat.min())}, '
                         f'{int(flat.max())}]')
    flat = flat.to(torch.uint8)
    n = flat.numel()
    if 8 % bits == 0:  # 1, 2, 4, 8: whole codes per byte
        per = 8 // bits
        pad = (-n) % per
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return (flat.view(-1, per) << shifts).sum(1, dtype=torch.uint8)
    # Any width: spread the codes into a bit stream, regroup into bytes.
    stream = ((flat.unsqueeze(1) >> torch.arange(bits, dtype=torch.uint8))
              & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (stream.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``numel`` codes as ``int64``."""
    bits = _check_pack_bits(bits)
    packed = packed.reshape(-1).to(torch.uint8)
    if packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f'{packed.numel()} bytes cannot hold exactly '
                         f'{numel} codes of {bits} bits '
                         f'({packed_nbytes(numel, bits)} expected)')
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        codes = (packed.unsqueeze(1) >> shifts) & mask
        return codes.reshape(-1)[:numel].to(torch.int64)
    stream = ((packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8))
              & 1).reshape(-1)[:numel * bits]
    weights = torch.tensor([1 << i for i in range(bits)], dtype=torch.int64)
    return (stream.view(numel, bits).to(torch.int64) * weights).sum(1)


# ---------------------------------------------------------------------------
# Weights of a fixed-bit layer
# ---------------------------------------------------------------------------
def _inv_levels(n: int) -> Tensor:
    # The layer computes 1 / n as a float32 tensor division: do the same.
    return (torch.ones(1) / torch.tensor([float(n)]))[0]


def dequantize_codes(codes: Tensor, threshold: Tensor, bits: int,
                     shape) -> Tensor:
    """``(c * (1 / n)) * T`` in float32, the order the layer uses."""
    t = threshold.detach().float()
    codes = codes.reshape(shape).float()
    if t.numel() > 1:
        t = t.reshape((-1, ) + (1, ) * (codes.dim() - 1))
    else:
        t = t.reshape(())
    return (codes * _inv_levels(weight_levels(bits))) * t


def weight_codes(module: nn.Module) -> Tuple[Tensor, Tensor]:
    """Integer codes and threshold of a fixed-bit layer's quantized weight.

    Returns:
        tuple: ``codes`` (int64, the weight's shape, in ``[-n, n]``) and
        ``T`` (float32, 0-d or one per output channel). Checked to
        dequantize to exactly what the layer's forward uses.
    """
    bits = module.w_bits
    n = weight_levels(bits)
    with torch.no_grad():
        w = module.weight.detach().float()
        t = weight_threshold(w, module.w_threshold, module.per_channel)
        safe = torch.where(t > 0, t, torch.ones_like(t))
        codes = torch.round(torch.clamp((w / safe) * n, -n, n)).to(torch.int64)
        t_flat = t.reshape(-1).clone()
        expected = quantize_weight(w, bits, module.w_threshold,
                                   module.per_channel)
        got = dequantize_codes(codes, t_flat, bits, w.shape)
        if not torch.equal(got, expected):
            diff = float((got - expected).abs().max())
            raise RuntimeError(
                f'{getattr(module, "layer_name", "")}: packed weight does '
                f'not reproduce the layer\'s quantized weight (max abs diff '
                f'{diff:.3g})')
    return codes, (t_flat if t_flat.numel() > 1 else t_flat.reshape(()))


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------
def export_quantized(
        model: nn.Module) -> Tuple['OrderedDict[str, Tensor]', Dict[str, str]]:
    """The tensors and metadata of an artifact of ``model``.

    Args:
        model: Any module; its fixed-bit layers (``QuantizedConv2d`` /
            ``QuantizedLinear``) with ``w_bits < 32`` get packed weights.

    Returns:
        tuple: ``tensors`` (name -> contiguous CPU tensor, owning its
        memory) and ``metadata`` (``format``, ``version`` and ``layers``;
        :func:`save_artifact` adds the rest).
    """
    state = model.state_dict()
    modules = dict(model.named_modules())
    layers = OrderedDict()
    replaced = {}
    for name, module in modules.items():
        if not is_quantized_layer(module):
            continue
        prefix = f'{name}.' if name else ''
        w_bits, a_bits = module.bits
        info = dict(
            w_bits=w_bits,
            a_bits=a_bits,
            signed=bool(module.signed),
            per_channel=bool(module.per_channel),
            kind='conv' if isinstance(module, nn.Conv2d) else 'linear',
            shape=list(module.weight.shape))
        if a_bits != FP_BITS:
            info['act_levels'] = activation_levels(a_bits, module.signed)
        replaced[prefix + 'w_threshold'] = None
        if w_bits != FP_BITS:
            codes, t = weight_codes(module)
            n = weight_levels(w_bits)
            info['levels'] = n
            replaced[prefix + 'weight'] = None
            replaced[prefix[:-1] + PACKED] = pack_bits(codes + n, w_bits)
            replaced[prefix[:-1] + THRESHOLD] = t.float()
            replaced[prefix[:-1] + SCALE] = (t.float() / n)
        layers[name] = info
    tensors = OrderedDict()
    for key, value in state.items():
        if key in replaced:
            continue
        tensors[key] = value.detach().cpu().contiguous().clone()
    for key, value in replaced.items():
        if value is not None:
            tensors[key] = value.contiguous().clone()
    metadata = dict(
        format=ARTIFACT_FORMAT,
        version=str(ARTIFACT_VERSION),
        layers=json.dumps(layers))
    return tensors, metadata


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return b''
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _metadata_digest(meta: Mapping[str, str]) -> str:
    body = json.dumps({
        k: v
        for k, v in meta.items() if k != 'metadata_sha256'
    },
                      sort_keys=True)
    return hashlib.sha256(body.encode('utf-8')).hexdigest()


def save_artifact(path: PathLike,
                  model: nn.Module,
                  config: Optional[Mapping] = None,
                  policy: Optional[Mapping] = None,
                  extra: Optional[Mapping] = None) -> dict:
    """Write ``model`` as a packed low-bit safetensors artifact.

    Args:
        path: The ``.safetensors`` file (written atomically).
        model: The (fixed-bit) network.
        config: The config that rebuilds it (JSON-able), stored as is.
        policy: Its bit policy (JSON-able).
        extra: Anything else JSON-able (source checkpoint, complexity...).

    Returns:
        dict: ``path``, ``bytes`` (file size), ``num_tensors``,
        ``packed_layers``.

    Example:
        >>> import os, tempfile
        >>> from gmpq_mm.quantization.convert import to_quantized
        >>> net = to_quantized(nn.Sequential(nn.Conv2d(3, 8, 3),
        ...                                  nn.Conv2d(8, 8, 3)), (2, 4))
        >>> path = os.path.join(tempfile.mkdtemp(), 'net.safetensors')
        >>> info = save_artifact(path, net)
        >>> info['packed_layers']
        1
        >>> state, meta = load_artifact(path)
        >>> meta['layers']['1']['w_bits'], tuple(state['1.weight'].shape)
        (2, (8, 8, 3, 3))
    """
    path = os.fspath(path)
    tensors, metadata = export_quantized(model)
    metadata['config'] = json.dumps(config if config is not None else None)
    metadata['policy'] = json.dumps(policy if policy is not None else None)
    metadata['extra'] = json.dumps(extra if extra is not None else {})
    metadata['tensors_sha256'] = json.dumps({
        name:
        hashlib.sha256(_tensor_bytes(t)).hexdigest()
        for name, t in tensors.items()
    })
    metadata['metadata_sha256'] = _metadata_digest(metadata)
    with atomic_path(path, suffix='.tmp') as tmp:
        save_file(dict(tensors), tmp, metadata=metadata)
    layers = json.loads(metadata['layers'])
    return dict(
        path=path,
        bytes=osp.getsize(path),
        num_tensors=len(tensors),
        packed_layers=sum(1 for v in layers.values()
                          if v['w_bits'] != FP_BITS))


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
_DTYPES = {
    'F64': (torch.float64, 8),
    'F32': (torch.float32, 4),
    'F16': (torch.float16, 2),
    'BF16': (torch.bfloat16, 2),
    'I64': (torch.int64, 8),
    'I32': (torch.int32, 4),
    'I16': (torch.int16, 2),
    'I8': (torch.int8, 1),
    'U8': (torch.uint8, 1),
    'BOOL': (torch.bool, 1)
}


def _fail(path: str, what: str) -> ArtifactError:
    return ArtifactError(f'{path}: {what}')


def _parse(path: str, data: bytes) -> Tuple[dict, dict, int]:
    """Header, metadata and data offset of a safetensors byte string,
    checked against the file size."""
    size = len(data)
    if size < 8:
        raise _fail(
            path, f'truncated: {size} bytes, too short for a '
            f'safetensors header')
    (header_len, ) = struct.unpack('<Q', data[:8])
    if 8 + header_len > size:
        raise _fail(
            path, f'truncated: the header needs {8 + header_len} '
            f'bytes, the file has {size}')
    try:
        header = json.loads(data[8:8 + header_len].decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(path, f'malformed safetensors header ({err})') from None
    if not isinstance(header, dict):
        raise _fail(path, 'malformed safetensors header (not an object)')
    meta = header.pop('__metadata__', None) or {}
    end = 0
    for name, entry in header.items():
        try:
            begin, stop = entry['data_offsets']
            dtype, shape = entry['dtype'], entry['shape']
        except (TypeError, KeyError, ValueError):
            raise _fail(path, f'malformed header entry for tensor '
                        f'{name!r}') from None
        if dtype not in _DTYPES:
            raise _fail(path, f'tensor {name!r} has unsupported dtype '
                        f'{dtype}')
        numel = 1
        for s in shape:
            numel *= int(s)
        if stop - begin != numel * _DTYPES[dtype][1] or begin > stop:
            raise _fail(
                path, f'tensor {name!r}: byte range [{begin}, '
                f'{stop}) does not match {dtype} {shape}')
        end = max(end, stop)
    offset = 8 + header_len
    if offset + end > size:
        raise _fail(
            path, f'truncated: the tensors need {offset + end} '
            f'bytes, the file has {size} (missing '
            f'{offset + end - size})')
    if offset + end < size:
        raise _fail(
            path, f'{size - offset - end} unexpected bytes after '
            f'the last tensor (altered or concatenated file)')
    return header, meta, offset


def _check_metadata(path: str, meta: Mapping) -> dict:
    if meta.get('format') != ARTIFACT_FORMAT:
        raise _fail(
            path, f'not a gmpq artifact (metadata "format" is '
            f'{meta.get("format")!r}, expected {ARTIFACT_FORMAT!r})')
    if meta.get('version') != str(ARTIFACT_VERSION):
        raise _fail(
            path, f'unsupported artifact version '
            f'{meta.get("version")!r} (expected {ARTIFACT_VERSION})')
    stored = meta.get('metadata_sha256')
    if stored is None:
        raise _fail(path, 'metadata has no "metadata_sha256" checksum')
    if _metadata_digest(meta) != stored:
        raise _fail(
            path, 'metadata checksum mismatch: the metadata was '
            'altered or corrupted')
    parsed = dict(meta)
    for key in _JSON_KEYS:
        try:
            parsed[key] = json.loads(meta.get(key, 'null'))
        except json.JSONDecodeError as err:
            raise _fail(path, f'metadata "{key}" is not valid JSON '
                        f'({err})') from None
    return parsed


def read_metadata(path: PathLike) -> dict:
    """The checked metadata of an artifact (JSON fields parsed), without
    its tensors' checksums (see :func:`load_artifact` for the full check)."""
    path = os.fspath(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'artifact not found: {path}')
    with open(path, 'rb') as f:
        data = f.read()
    _, meta, _ = _parse(path, data)
    return _check_metadata(path, meta)


def load_artifact(path: PathLike) -> Tuple['OrderedDict[str, Tensor]', dict]:
    """Read, check and unpack an artifact written by :func:`save_artifact`.

    Returns:
        tuple: ``state`` (a ``state_dict`` for the rebuilt network: packed
        weights dequantized, ``w_threshold`` buffers set to ``T``, empty for
        FP-bit weights) and ``meta`` (``format``, ``version``, ``layers``,
        ``config``, ``policy``, ``extra``... parsed).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ArtifactError: (a ``ValueError``) naming the file, for a truncated
            file, a malformed header, altered metadata, a tensor whose
            checksum does not match, a missing or unexpected tensor.
    """
    path = os.fspath(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'artifact not found: {path}')
    with open(path, 'rb') as f:
        data = f.read()
    header, raw_meta, offset = _parse(path, data)
    meta = _check_metadata(path, raw_meta)
    sums = meta['tensors_sha256']
    if not isinstance(sums, dict):
        raise _fail(path, 'metadata "tensors_sha256" is not an object')
    missing = sorted(set(sums) - set(header))
    unexpected = sorted(set(header) - set(sums))
    if missing or unexpected:
        raise _fail(
            path, f'tensors do not match the checksum table '
            f'(missing {missing}, unexpected {unexpected})')
    view = memoryview(data)
    for name, entry in header.items():
        begin, stop = entry['data_offsets']
        digest = hashlib.sha256(view[offset + begin:offset + stop]).hexdigest()
        if digest != sums[name]:
            raise _fail(
                path, f'checksum mismatch for tensor {name!r}: the '
                f'file was altered or corrupted')
    try:
        tensors = st_load(bytes(data))
    except Exception as err:  # noqa: BLE001 - safetensors' own error types
        raise _fail(path, f'cannot read tensors ({err})') from None

    layers = meta['layers'] or {}
    state = OrderedDict()
    packed_of = {}
    for name, info in layers.items():
        prefix = f'{name}.' if name else ''
        if info['w_bits'] != FP_BITS:
            packed_of[prefix + 'weight'] = (name, info)
    consumed = set()
    for key in tensors:
        if key.endswith((PACKED, THRESHOLD, SCALE)):
            continue
        state[key] = tensors[key]
    for wkey, (name, info) in packed_of.items():
        base = wkey[:-len('.weight')]
        try:
            packed = tensors[base + PACKED]
            t = tensors[base + THRESHOLD]
        except KeyError as err:
            raise _fail(path, f'layer {name!r}: tensor {err} is '
                        f'missing') from None
        consumed.update({base + PACKED, base + THRESHOLD, base + SCALE})
        bits, n = info['w_bits'], weight_levels(info['w_bits'])
        numel = 1
        for s in info['shape']:
            numel *= int(s)
        try:
            codes = unpack_bits(packed, bits, numel) - n
        except ValueError as err:
            raise _fail(path, f'layer {name!r}: {err}') from None
        state[wkey] = dequantize_codes(codes, t, bits, info['shape'])
        state[base + '.w_threshold'] = t.reshape(-1).clone()
    for name, info in layers.items():
        prefix = f'{name}.' if name else ''
        if info['w_bits'] == FP_BITS:
            state[prefix + 'w_threshold'] = torch.empty(0)
    leftovers = [
        k for k in tensors
        if k.endswith((PACKED, THRESHOLD, SCALE)) and k not in consumed
    ]
    if leftovers:
        raise _fail(
            path, f'packed tensors {leftovers} belong to no layer '
            f'of the metadata')
    return state, meta
