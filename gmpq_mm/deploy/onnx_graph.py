"""The float-compute QDQ ONNX graph: weight folding and its checks.

Every quantized layer of a finetuned network (``QuantizedConv2d`` /
``QuantizedLinear``) becomes, in the ONNX graph::

    x -> Clip(lo, r) -> QuantizeLinear(s_a) -> DequantizeLinear(s_a) -+
                                                                   Conv/Gemm
    int8 codes (initializer) -> DequantizeLinear(s_w, axis 0) -------+

which is the "QDQ" form onnxruntime and TensorRT consume. The b-bit grids
are kept exactly:

* activations (PACT, range ``r``, see :mod:`.quantizers`): the Clip bounds
  are ``[0, r]`` (unsigned) or ``[-r, r]`` (signed) and the scale is
  ``s_a = r / n`` with ``n = 2^b - 1`` (unsigned) or ``2^(b-1) - 1``
  (signed), zero point 0. After the Clip, ``round(x / s_a)`` lies in
  ``[0, n]`` or ``[-n, n]``: ``2^b`` or ``2^b - 1`` levels held in an
  ``int8`` container (``uint8`` only for unsigned 8 bits, ``n = 255``).
* weights (symmetric, threshold ``T``, per tensor or per output channel):
  the initializer holds the integer codes ``c`` in ``[-n, n]``
  (``n = 2^(b-1) - 1``) as ``int8``, the DequantizeLinear scale is
  ``T / n`` (zero point 0): at most ``2^b - 1`` distinct values per scale.

Layers at 32 bits stay float (a 32-bit weight is a float initializer, a
32-bit activation gets no Clip/QDQ); so does everything that is not a
quantized layer (stem, BatchNorm, pooling, classifier unless quantized).

How the graph is made: :func:`qdq_module` copies the network and replaces
each quantized layer by a :class:`QDQConv2d` / :class:`QDQLinear`, which
computes the same function with plain torch ops
(``clamp``, ``fake_quantize_per_tensor_affine``,
``fake_quantize_per_channel_affine``, ``conv2d`` / ``linear``) that the
TorchScript ONNX exporter maps to Clip / QuantizeLinear / DequantizeLinear /
Conv / Gemm (the custom autograd functions of the training layers cannot be
traced). The exporter writes each weight as a float initializer followed by
QuantizeLinear; :func:`finalize_qdq_model` replaces those by ``int8``
initializers holding the layer's integer codes (checked equal to
:func:`gmpq_mm.quantization.export.weight_codes`) and checks the result
(:func:`check_qdq_model`).

Numerics against the training layer: the layer computes ``round(clamp(x *
(n / r), lo, n)) * (r / n)``, QuantizeLinear ``round(x / (r / n))``; both
round half to even and differ only where the float products straddle a
rounding tie (a handful of activations in millions, one level each). Weight
values differ by at most one float32 rounding (``c * (T / n)`` against
``(c * (1 / n)) * T``).

Needs ``onnx`` (and ``onnxruntime`` for :func:`run_onnxruntime`), the
``[deploy]`` extra; imported lazily. Pure PyTorch otherwise: nothing from
mmengine / mmpretrain.
"""
import json
from collections import OrderedDict
from typing import Dict, Mapping

import numpy as np

from gmpq_mm.quantization.quantizers import FP_BITS, weight_levels

__all__ = [
    'ONNX_OPSET', 'constants', 'finalize_qdq_model', 'check_qdq_model',
    'set_metadata'
]

# Per-axis QuantizeLinear / DequantizeLinear need opset 13; 17 is what
# onnxruntime, recent TensorRT and the TorchScript exporter all support.
ONNX_OPSET = 17
_STANDARD_DOMAINS = ('', 'ai.onnx')


def constants(graph) -> Dict[str, np.ndarray]:
    """Values of the graph's initializers, Constant nodes and Identity
    nodes of those, by name."""
    from onnx import numpy_helper
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.domain not in _STANDARD_DOMAINS:
            continue
        if node.op_type == 'Constant':
            for attr in node.attribute:
                if attr.name == 'value':
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
        elif node.op_type == 'Identity' and node.input[0] in values:
            # the exporter aliases identical parameters through Identity
            values[node.output[0]] = values[node.input[0]]
    return values


def _quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray,
              axis: int) -> np.ndarray:
    """QuantizeLinear of the ONNX spec (division, round half to even,
    saturation) in numpy."""
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = zero.reshape(shape)
    info = np.iinfo(zero.dtype)
    q = np.rint(x.astype(np.float32) / scale.astype(np.float32))
    return np.clip(q + zero.astype(np.float32), info.min,
                   info.max).astype(zero.dtype)


def finalize_qdq_model(model_proto, layers: Mapping[str, dict]):
    """Fold the weight quantizers of an exported QDQ graph (in place).

    Each ``QuantizeLinear`` that reads a layer's float weight initializer is
    removed; its ``DequantizeLinear`` then reads an ``int8`` initializer
    ``<weight>_quantized`` holding the layer's codes, which must equal what
    QuantizeLinear computes from the float weight.

    Args:
        model_proto (onnx.ModelProto): As written by the exporter.
        layers: :func:`qdq_layer_info` of the exported module.

    Returns:
        onnx.ModelProto: ``model_proto``, edited.

    Raises:
        RuntimeError: naming the layer, if its weight quantizer is not in
            the graph or its codes disagree.
    """
    from onnx import numpy_helper
    graph = model_proto.graph
    consts = constants(graph)
    by_weight = {
        v['weight']: (k, v)
        for k, v in layers.items() if v['codes'] is not None
    }
    users = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    folded, drop = set(), []
    for node in list(graph.node):
        if node.op_type != 'QuantizeLinear' or node.input[0] not in by_weight:
            continue
        wname = node.input[0]
        lname, info = by_weight[wname]
        axis = next((a.i for a in node.attribute if a.name == 'axis'), 1)
        scale = consts[node.input[1]]
        zero = consts[node.input[2]]
        expected = info['codes'].numpy()
        got = _quantize(consts[wname], scale, zero, axis)
        if zero.dtype != np.int8 or np.any(zero != 0) or \
                not np.array_equal(got.astype(np.int64),
                                   expected.astype(np.int64)):
            raise RuntimeError(
                f'{lname}: the exported weight quantizer does not reproduce '
                f'the layer\'s integer codes')
        if not np.allclose(
                scale.reshape(-1),
                info['w_scale'].numpy().reshape(-1),
                rtol=0,
                atol=0):
            raise RuntimeError(f'{lname}: exported weight scale differs '
                               'from the layer\'s')
        qname = f'{wname}_quantized'
        graph.initializer.append(
            numpy_helper.from_array(expected.astype(np.int8), qname))
        for user in users.get(node.output[0], []):
            if user.op_type != 'DequantizeLinear':
                raise RuntimeError(f'{lname}: the weight quantizer feeds a '
                                   f'{user.op_type}, not DequantizeLinear')
            user.input[0] = qname
        drop.append(node)
        folded.add(wname)
    missing = sorted(set(by_weight) - folded)
    if missing:
        raise RuntimeError(
            f'{by_weight[missing[0]][0]}: its weight quantizer was not found '
            'in the exported graph')
    for node in drop:
        graph.node.remove(node)
    still_used = {name for node in graph.node for name in node.input}
    keep = [
        t for t in graph.initializer
        if t.name not in folded or t.name in still_used
    ]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return model_proto


def check_qdq_model(model_proto, layers: Mapping[str, dict]) -> dict:
    """Check a finalized QDQ model; returns its summary.

    Checked: the ONNX checker passes; every node is in the standard domain;
    each quantized weight is an ``int8`` initializer of codes in ``[-n, n]``
    read by a DequantizeLinear, whose values (codes times scale) take at
    most ``2^w_bits`` distinct values per scale (per output channel, or over
    the tensor), and which feeds one Conv / Gemm; that op's input is
    Clip -> QuantizeLinear -> DequantizeLinear with the layer's range and
    scale (zero point 0) exactly when the layer quantizes its input, so the
    codes stay on the ``2^a_bits`` levels; as many Conv / Gemm nodes read a
    quantized input as there are quantized inputs; the batch dimension of
    the input is symbolic.

    Returns:
        dict: ``nodes`` (op type -> count), ``quantize_linear``,
        ``dequantize_linear``, ``layers`` (name -> ``w_bits``, ``a_bits``,
        ``distinct_weights``, ``max_distinct_per_scale``), ``opset``.

    Raises:
        RuntimeError: naming the layer or node at fault.
    """
    import onnx
    from onnx import numpy_helper
    onnx.checker.check_model(model_proto)
    graph = model_proto.graph
    foreign = sorted({n.domain for n in graph.node} - set(_STANDARD_DOMAINS))
    if foreign:
        raise RuntimeError(f'the graph uses custom op domains {foreign}')
    counts = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    inits = {t.name: t for t in graph.initializer}
    consts = constants(graph)
    dq_of = {
        n.input[0]: n
        for n in graph.node if n.op_type == 'DequantizeLinear'
    }
    summary = OrderedDict()
    for lname, info in layers.items():
        row = dict(w_bits=info['w_bits'], a_bits=info['a_bits'])
        if info['codes'] is not None:
            qname = info['weight'] + '_quantized'
            if qname not in inits or qname not in dq_of:
                raise RuntimeError(f'{lname}: no int8 weight initializer '
                                   'read by a DequantizeLinear')
            codes = numpy_helper.to_array(inits[qname])
            if codes.dtype != np.int8:
                raise RuntimeError(f'{lname}: weight initializer is '
                                   f'{codes.dtype}, not int8')
            dq = dq_of[qname]
            scale = consts[dq.input[1]].astype(np.float32)
            values = codes.astype(np.float32) * (
                scale.reshape((-1, ) + (1, ) *
                              (codes.ndim - 1)) if scale.size > 1 else scale)
            per = (
                values.reshape(values.shape[0], -1)
                if scale.size > 1 else values.reshape(1, -1))
            most = max(len(np.unique(r)) for r in per)
            n = weight_levels(info['w_bits'])
            top = int(np.abs(codes.astype(np.int64)).max(initial=0))
            if top > n:
                raise RuntimeError(
                    f'{lname}: weight code {top} outside the [-{n}, {n}] of '
                    f'its {info["w_bits"]}-bit grid')
            if most > 2**info['w_bits']:
                raise RuntimeError(
                    f'{lname}: {most} distinct weight values per scale, '
                    f'more than the 2^{info["w_bits"]} of its grid')
            row.update(
                distinct_weights=int(len(np.unique(values))),
                max_distinct_per_scale=int(most))
        summary[lname] = row
    # The exporter may merge identical Clip -> Q -> DQ chains (two layers
    # reading the same tensor with the same range): count the layers they
    # feed, not the chains.
    producer = {o: n for n in graph.node for o in n.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    ops = [n for n in graph.node if n.op_type in ('Conv', 'Gemm')]
    chains = {n.output[0]: _act_chain(n, producer, inits) for n in ops}
    n_act = sum(1 for v in layers.values() if v['a_bits'] != FP_BITS)
    n_fed = sum(1 for c in chains.values() if c is not None)
    if n_fed != n_act:
        raise RuntimeError(f'{n_fed} Conv / Gemm nodes read a quantized '
                           f'input, for {n_act} quantized layer inputs')
    for lname, info in layers.items():
        if info['codes'] is None:
            continue
        dq = dq_of[info['weight'] + '_quantized']
        op = [
            n for n in consumers.get(dq.output[0], [])
            if n.op_type in ('Conv', 'Gemm')
        ]
        if len(op) != 1:
            raise RuntimeError(f'{lname}: its dequantized weight feeds '
                               f'{len(op)} Conv / Gemm nodes, not 1')
        chain = chains[op[0].output[0]]
        if info['a_bits'] == FP_BITS:
            if chain is not None:
                raise RuntimeError(f'{lname}: a full-precision input got a '
                                   'QuantizeLinear')
            continue
        if chain is None:
            raise RuntimeError(f'{lname}: its input is not Clip -> '
                               'QuantizeLinear -> DequantizeLinear')
        clip, q, _ = chain
        lo = -info['act_range'] if info['signed'] else 0.0
        bounds = (float(consts[clip.input[1]]), float(consts[clip.input[2]]))
        scale = float(consts[q.input[1]])
        if bounds != (np.float32(lo), np.float32(info['act_range'])) or \
                scale != np.float32(info['act_scale']) or \
                np.any(consts[q.input[2]] != 0):
            raise RuntimeError(
                f'{lname}: input Clip {bounds} / scale {scale:g} differ from '
                f'the layer\'s range {info["act_range"]:g} and scale '
                f'{info["act_scale"]:g}')
    dims = graph.input[0].type.tensor_type.shape.dim
    if not dims or not dims[0].dim_param:
        raise RuntimeError('the input has a fixed batch size')
    return dict(
        nodes=counts,
        quantize_linear=counts.get('QuantizeLinear', 0),
        dequantize_linear=counts.get('DequantizeLinear', 0),
        opset=max(o.version for o in model_proto.opset_import
                  if o.domain in _STANDARD_DOMAINS),
        layers=summary)


def _act_chain(op, producer, inits):
    """``(Clip, QuantizeLinear, DequantizeLinear)`` that feed input 0 of
    ``op``, or None when its input is not a quantized activation."""
    dq = producer.get(op.input[0])
    if dq is None or dq.op_type != 'DequantizeLinear' or dq.input[0] in inits:
        return None
    q = producer.get(dq.input[0])
    if q is None or q.op_type != 'QuantizeLinear':
        return None
    clip = producer.get(q.input[0])
    if clip is None or clip.op_type != 'Clip':
        raise RuntimeError(f'QuantizeLinear {q.name!r} is not fed by a '
                           'Clip: its codes could leave the b-bit grid')
    return clip, q, dq


def set_metadata(model_proto, metadata: Mapping[str, object]) -> None:
    """Write ``metadata`` (values JSON-encoded unless str) as the model's
    ``metadata_props``."""
    for key, value in metadata.items():
        prop = model_proto.metadata_props.add()
        prop.key = str(key)
        prop.value = value if isinstance(value, str) else json.dumps(value)
