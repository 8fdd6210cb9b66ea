"""Rewrite a float-compute QDQ graph into one onnxruntime runs in integers.

The float-compute QDQ graph (:mod:`.onnx_graph`) quantizes each layer's
input and weight but leaves the convolution's output in float, followed by
BatchNorm and ReLU as in training. onnxruntime's QDQ fusion only turns
``DQ(x), DQ(w), DQ(bias) -> Conv -> Q`` into a ``QLinearConv``, so that
graph runs every layer as a float Conv. :func:`integerize` rewrites it:

* **BatchNorm folded** into each quantized conv: the per-channel factor
  ``g = gamma / sqrt(var + eps)`` goes into the weight *scale*, so the int8
  codes stay the layer's b-bit codes (negated in a channel whose ``g`` is
  negative, which keeps them on the symmetric grid), multiplied by the
  integer ``m`` of :func:`~gmpq_mm.quantization.integer_fold.code_multiplier`
  (scale divided by ``m``: the same ``2^b`` weights); the shift becomes the
  bias, quantized to int32 with scale ``s_x * s_w / m`` as onnxruntime wants
  (:mod:`gmpq_mm.quantization.integer_fold`).
* **Outputs requantized.** When every reader of a conv's output (after its
  ReLU) is a quantized layer with the same grid, the output is quantized
  straight onto that grid: ``QuantizeLinear(s_a)`` into ``uint8`` (``int8``
  when signed), then an integer ``Clip`` to ``[0, n]`` (``[-n, n]``), then
  ``DequantizeLinear(s_a)``. The ReLU is dropped: clipping to ``[0, n]``
  already clips below at 0. This is the layer's own input quantizer, moved
  before the ReLU, so nothing is lost.
* **Eight-bit points the PyTorch model has.** A conv or residual ``Add``
  output already read by an 8-bit ``QuantizeLinear`` (a requantization
  point of the model, :mod:`gmpq_mm.quantization.requant_point`) keeps it,
  with the model's scale: the file then rounds where the model rounds.
* **Eight-bit points the PyTorch model does not have.** Every other
  requantized tensor (a conv output that also feeds a residual ``Add`` or a
  float op, the residual ``Add``'s inputs and output) gets an 8-bit
  ``Q -> DQ`` whose range is the largest magnitude seen on calibration
  inputs: ``uint8`` with zero point 0 for a non-negative tensor, symmetric
  ``int8`` otherwise. With both inputs and the output quantized, onnxruntime
  runs the residual ``Add`` as ``QLinearAdd``. These points add error; it is
  measured, not assumed (``docs/user_guides/export.md``).

Layers with a 32-bit weight or a 32-bit input, and layers the policy does
not cover (stem, classifier unless quantized), stay float.

Pure numpy / onnx; nothing from mmengine or mmpretrain.
"""
from collections import OrderedDict
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from gmpq_mm.quantization.integer_fold import code_multiplier, fold_conv_scales
from gmpq_mm.quantization.quantizers import weight_levels
from .onnx_graph import _STANDARD_DOMAINS, constants

__all__ = [
    'integerize', 'integer_layers', 'check_integer_model', 'INTEGER_OPS'
]

# What onnxruntime's CPU provider turns the integer layers into.
INTEGER_OPS = ('QLinearConv', 'ConvInteger')


class _Index:
    """Producer / consumer maps of a graph (rebuilt after each edit)."""

    def __init__(self, graph):
        self.graph = graph
        self.refresh()

    def refresh(self):
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: Dict[str, list] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in self.graph.output}

    def users(self, name: str) -> list:
        return self.consumers.get(name, [])


class _Builder:
    """Adds initializers and nodes with fresh names."""

    def __init__(self, graph):
        self.graph = graph
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f'gmpq_int/{stem}_{self.count}'

    def const(self, stem: str, value: np.ndarray) -> str:
        from onnx import numpy_helper
        name = self.name(stem)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: Sequence[str], stem: str, **attrs):
        from onnx import helper
        out = self.name(stem)
        node = helper.make_node(
            op, list(inputs), [out], name=self.name(op), **attrs)
        return node, out


def integer_layers(layers: Mapping[str, dict]) -> List[str]:
    """Names of the layers that run on integer kernels: quantized weights
    and a quantized input."""
    return [
        k for k, v in layers.items()
        if v['codes'] is not None and v.get('act_scale') is not None
    ]


def _multiplier(info: Mapping) -> int:
    """:func:`code_multiplier` of a layer of ``qdq_layer_info``."""
    return code_multiplier(info['w_bits'],
                           int(round(info['act_range'] / info['act_scale'])))


def _chain_of(clip, index: _Index, consts: dict) -> Optional[dict]:
    """The grid of ``Clip -> QuantizeLinear -> DequantizeLinear`` starting at
    ``clip`` (an activation quantizer of the float-QDQ graph), or None."""
    if clip.op_type != 'Clip' or len(clip.input) < 3 or \
            clip.input[1] not in consts or clip.input[2] not in consts:
        return None
    users = index.users(clip.output[0])
    if len(users) != 1 or users[0].op_type != 'QuantizeLinear':
        return None
    q = users[0]
    if len(q.input) < 2 or q.input[1] not in consts:
        return None  # an 8-bit point still waiting for its range
    dqs = index.users(q.output[0])
    if not dqs or any(d.op_type != 'DequantizeLinear' for d in dqs):
        return None
    lo = float(consts[clip.input[1]])
    hi = float(consts[clip.input[2]])
    scale = np.float32(consts[q.input[1]])
    return dict(
        clip=clip,
        q=q,
        dqs=dqs,
        lo=lo,
        hi=hi,
        scale=scale,
        signed=lo < 0,
        levels=int(round(hi / float(scale))))


def _act_node(tensor: str, index: _Index, consts: dict):
    """The ReLU (or constant-bound Clip with a lower bound <= 0) that is the
    only reader of ``tensor``, or None."""
    users = index.users(tensor)
    if len(users) != 1 or tensor in index.outputs:
        return None
    act = users[0]
    if act.op_type == 'Relu':
        return act
    if act.op_type == 'Clip' and len(act.input) == 3 and \
            act.input[1] in consts and act.input[2] in consts and \
            float(consts[act.input[1]]) <= 0 and \
            _chain_of(act, index, consts) is None:
        return act
    return None


def _replace_uses(graph, old: str, new: str, only=None) -> None:
    for node in graph.node:
        if only is not None and node not in only:
            continue
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


class _Rewriter:

    def __init__(self, proto, layers, ranges: Callable[[Sequence[str]],
                                                       Dict[str, tuple]]):
        self.proto = proto
        self.graph = proto.graph
        self.layers = layers
        self.ranges = ranges
        self.index = _Index(self.graph)
        self.consts = constants(self.graph)
        self.build = _Builder(self.graph)
        # tensor -> (Q node, DQ node) still waiting for a calibrated range
        self.pending: List[tuple] = []
        self.added_points: List[str] = []

    # -- conv layers -------------------------------------------------------
    def conv_of(self, name: str, info: dict):
        qname = info['weight'] + '_quantized'
        dq = [
            n for n in self.graph.node
            if n.op_type == 'DequantizeLinear' and n.input[0] == qname
        ]
        if len(dq) != 1:
            raise RuntimeError(f'{name}: no int8 weight initializer read by '
                               'one DequantizeLinear')
        ops = self.index.users(dq[0].output[0])
        if len(ops) != 1 or ops[0].op_type not in ('Conv', 'Gemm'):
            raise RuntimeError(f'{name}: its dequantized weight does not '
                               'feed exactly one Conv / Gemm')
        return ops[0], dq[0]

    def fold_conv(self, name: str, info: dict) -> Optional[str]:
        """Fold the BatchNorm after ``name``'s Conv and quantize its bias;
        returns the Conv's output tensor, or None for a Gemm."""
        conv, wdq = self.conv_of(name, info)
        if conv.op_type != 'Conv':
            return None
        in_dq = self.index.producer.get(conv.input[0])
        if in_dq is None or in_dq.op_type != 'DequantizeLinear':
            raise RuntimeError(f'{name}: its input is not dequantized')
        s_x = np.float32(self.consts[in_dq.input[1]])
        codes = info['codes'].numpy().astype(np.int8)
        c_out = codes.shape[0]
        s_w = np.broadcast_to(
            np.asarray(self.consts[wdq.input[1]], np.float32).reshape(-1),
            (c_out, )).astype(np.float64)
        bias = np.zeros(c_out, np.float64)
        if len(conv.input) > 2 and conv.input[2]:
            bias = self.consts[conv.input[2]].astype(np.float64)
        out = conv.output[0]
        users = self.index.users(out)
        if len(users) == 1 and users[0].op_type == 'BatchNormalization' and \
                all(i in self.consts for i in users[0].input[1:5]):
            bn = users[0]
            gamma, beta, mean, var = (
                self.consts[i].astype(np.float64) for i in bn.input[1:5])
            eps = next((a.f for a in bn.attribute if a.name == 'epsilon'),
                       1e-5)
            g = gamma / np.sqrt(var + eps)
            bias = (bias - mean) * g + beta
            out = bn.output[0]
            self.graph.node.remove(bn)
        else:
            g = np.ones(c_out)
        m = _multiplier(info)
        sign, s_w, s_b, b_codes = fold_conv_scales(s_x, s_w, bias, g, m)
        codes = (codes.astype(np.int16) * m *
                 sign.reshape((-1, ) + (1, ) * (codes.ndim - 1))).astype(
                     np.int8)
        if np.abs(b_codes).max(initial=0) >= 2**31 - 1:
            raise RuntimeError(f'{name}: its folded bias does not fit int32 '
                               f'at scale s_x * s_w (s_x={s_x:g})')
        w_init = self.build.const(f'{name}.weight_folded', codes)
        w_scale = self.build.const(f'{name}.w_scale', s_w)
        w_zero = self.build.const(f'{name}.w_zero', np.zeros(c_out, np.int8))
        b_init = self.build.const(f'{name}.bias_int32',
                                  b_codes.astype(np.int32))
        b_scale = self.build.const(f'{name}.b_scale', s_b.astype(np.float32))
        b_zero = self.build.const(f'{name}.b_zero', np.zeros(c_out, np.int32))
        wnode, w_out = self.build.node(
            'DequantizeLinear', [w_init, w_scale, w_zero], 'w', axis=0)
        bnode, b_out = self.build.node(
            'DequantizeLinear', [b_init, b_scale, b_zero], 'b', axis=0)
        pos = list(self.graph.node).index(conv)
        self.graph.node.insert(pos, bnode)
        self.graph.node.insert(pos, wnode)
        self.graph.node.remove(wdq)
        conv.input[1] = w_out
        if len(conv.input) > 2:
            conv.input[2] = b_out
        else:
            conv.input.append(b_out)
        conv.output[0] = out
        conv.name = name  # onnxruntime keeps it on the fused node
        self.index.refresh()
        return out

    # -- requantization ----------------------------------------------------
    def requantize(self, tensor: str) -> None:
        """Make every reader of ``tensor`` (after its ReLU) read a
        DequantizeLinear of a requantized copy."""
        act = _act_node(tensor, self.index, self.consts)
        after = act.output[0] if act is not None else tensor
        users = self.index.users(after)
        if users and all(self._model_point(u) for u in users):
            return  # the model's own 8-bit point (a RequantPoint)
        chains = [_chain_of(u, self.index, self.consts) for u in users]
        grids = {(c['lo'], c['hi'], float(c['scale']))
                 for c in chains if c is not None}
        if users and None not in chains and len(grids) == 1 and \
                after not in self.index.outputs:
            self._onto_grid(tensor, act, chains)
        else:
            self._eight_bit(tensor, act)

    def _model_point(self, node) -> bool:
        """Whether ``node`` is an 8-bit ``QuantizeLinear`` the model put
        there (a ``RequantPoint``): constant scale and 8-bit zero point,
        every reader a DequantizeLinear."""
        if node.op_type != 'QuantizeLinear' or len(node.input) < 3 or \
                node.input[1] not in self.consts or \
                node.input[2] not in self.consts:
            return False
        zero = self.consts[node.input[2]]
        readers = self.index.users(node.output[0])
        return zero.dtype in (np.int8, np.uint8) and bool(readers) and all(
            r.op_type == 'DequantizeLinear' for r in readers)

    def _onto_grid(self, tensor, act, chains) -> None:
        grid = chains[0]
        src = act.output[0] if act is not None else tensor
        droppable = act is not None and not grid['signed'] and (
            act.op_type == 'Relu'
            or float(self.consts[act.input[2]]) >= grid['hi'])
        if droppable:
            src = tensor
        dtype = np.int8 if grid['signed'] else np.uint8
        n = grid['levels']
        zero = self.build.const('zero', np.array(0, dtype))
        scale = self.build.const('scale', np.array(grid['scale'], np.float32))
        nodes = []
        qnode, q_out = self.build.node('QuantizeLinear', [src, scale, zero],
                                       'q')
        nodes.append(qnode)
        top = 127 if grid['signed'] else 255
        if n < top:
            lo = self.build.const('lo',
                                  np.array(-n if grid['signed'] else 0, dtype))
            hi = self.build.const('hi', np.array(n, dtype))
            cnode, q_out = self.build.node('Clip', [q_out, lo, hi], 'clip')
            nodes.append(cnode)
        dnode, d_out = self.build.node('DequantizeLinear',
                                       [q_out, scale, zero], 'dq')
        nodes.append(dnode)
        for chain in chains:
            for dq in chain['dqs']:
                _replace_uses(self.graph, dq.output[0], d_out)
        self._insert_after(src, nodes)
        for chain in chains:
            for node in [chain['clip'], chain['q']] + chain['dqs']:
                if node in self.graph.node:
                    self.graph.node.remove(node)
        if droppable:
            self.graph.node.remove(act)
        self.index.refresh()

    def _eight_bit(self, tensor, act, only=None) -> str:
        """An 8-bit ``Q -> DQ`` on ``tensor`` (after ``act``), its range to
        be calibrated; every reader (or only ``only``) reads the DQ."""
        src = act.output[0] if act is not None else tensor
        qnode, q_out = self.build.node('QuantizeLinear', [src], 'q8')
        dnode, d_out = self.build.node('DequantizeLinear', [q_out], 'dq8')
        users = [u for u in self.index.users(src) if only is None or u in only]
        relu = act is not None and act.op_type == 'Relu' and only is None
        for user in users:
            for i, name in enumerate(user.input):
                if name == src:
                    user.input[i] = d_out
        if src in self.index.outputs:
            raise RuntimeError(f'{src}: a graph output cannot be requantized')
        if relu:  # uint8 with zero point 0 clips at 0 itself
            qnode.input[0] = tensor
            self.graph.node.remove(act)
        self._insert_after(qnode.input[0], [qnode, dnode])
        # protobuf copies a node on insert: keep names, not the objects
        self.pending.append((src, qnode.name, dnode.name, relu))
        self.added_points.append(src)
        self.index.refresh()
        return d_out

    def _insert_after(self, tensor: str, nodes) -> None:
        producer = self.index.producer.get(tensor)
        pos = 0 if producer is None else \
            list(self.graph.node).index(producer) + 1
        for node in reversed(nodes):
            self.graph.node.insert(pos, node)

    def residual_adds(self) -> None:
        """Quantize both inputs and the output of every Add of two
        computed tensors (the residual connections)."""
        adds = [
            n for n in self.graph.node
            if n.op_type == 'Add' and all(i not in self.consts
                                          for i in n.input)
        ]
        for add in adds:
            for name in list(add.input):
                producer = self.index.producer.get(name)
                if producer is None or producer.op_type != 'DequantizeLinear':
                    self._eight_bit(name, None, only=[add])
            self.requantize(add.output[0])

    def unsigned_containers(self) -> None:
        """Activation quantizers left in the float graph (fed by a float
        op, e.g. the stem) hold an unsigned grid in ``uint8``, as
        onnxruntime's integer kernels want, instead of ``int8``."""
        for clip in list(self.graph.node):
            chain = _chain_of(clip, self.index, self.consts)
            if chain is None or chain['signed']:
                continue
            zero = self.build.const('zero', np.array(0, np.uint8))
            chain['q'].input[2] = zero
            for dq in chain['dqs']:
                dq.input[2] = zero

    def signed_in_uint8(self) -> None:
        """Every activation held in ``int8`` (a signed grid, a symmetric
        8-bit point) moves to ``uint8`` with zero point 128: the same codes
        shifted by 128, so the same values. onnxruntime fuses a conv or an
        add only when its quantized input and output have one type, and a
        signed tensor between unsigned ones (MobileNetV2's linear
        bottlenecks, a residual branch) otherwise leaves the layer in
        float. An integer Clip on the codes moves with them."""
        self.index.refresh()
        self.consts = constants(self.graph)
        weights = {t.name for t in self.graph.initializer}
        for q in list(self.graph.node):
            if q.op_type != 'QuantizeLinear' or q.input[0] in weights or \
                    len(q.input) < 3 or q.input[2] not in self.consts:
                continue
            zero = self.consts[q.input[2]]
            if zero.dtype != np.int8 or zero.size != 1:
                continue
            shifted = self.build.const('zero_u8',
                                       np.array(int(zero) + 128, np.uint8))
            q.input[2] = shifted
            readers = list(self.index.users(q.output[0]))
            for node in readers:
                if node.op_type == 'Clip':  # integer Clip on the codes
                    for i in (1, 2):
                        node.input[i] = self.build.const(
                            'bound_u8',
                            np.array(
                                int(self.consts[node.input[i]]) + 128,
                                np.uint8))
                    readers += self.index.users(node.output[0])
                elif node.op_type == 'DequantizeLinear':
                    node.input[2] = shifted
                else:
                    raise RuntimeError(f'{q.name}: an int8 activation read '
                                       f'by a {node.op_type}')

    def _aligned(self, dnode, hi: float) -> Optional[float]:
        """An 8-bit scale ``s_a / k`` (``k`` odd, ``255 s_a / k >= hi``)
        when the point's DequantizeLinear feeds quantizers of one unsigned
        grid ``s_a``: requantizing onto that grid then rounds exactly as
        one rounding of the value would (a grid boundary ``(j + 1/2) s_a``
        is an 8-bit rounding boundary), so the second rounding adds no
        error. None when there is no such reader or no such ``k``."""
        chains = [
            _chain_of(u, self.index, self.consts)
            for u in self.index.users(dnode.output[0]) if u.op_type == 'Clip'
        ]
        grids = {float(c['scale']) for c in chains if c is not None}
        if len(grids) != 1 or any(c is None or c['signed'] for c in chains):
            return None
        s_a = grids.pop()
        k = int(np.floor(255.0 * s_a / hi)) if hi > 0 else 0
        k -= 1 - k % 2  # the largest odd k that still covers [0, hi]
        return s_a / k if k >= 1 else None

    def calibrate(self) -> None:
        """Fill the scales of the 8-bit points from :attr:`ranges`."""
        if not self.pending:
            return
        found = self.ranges(
            list(OrderedDict.fromkeys(p[0] for p in self.pending)))
        by_name = {n.name: n for n in self.graph.node}
        for src, qname, dname, relu in self.pending:
            qnode, dnode = by_name[qname], by_name[dname]
            lo, hi = found[src]
            if relu:
                lo = max(lo, 0.0)
            if lo >= 0:
                dtype, scale = np.uint8, hi / 255.0
                scale = self._aligned(dnode, hi) or scale
            else:
                dtype, scale = np.int8, max(-lo, hi) / 127.0
            scale = np.float32(scale if scale > 0 else 1.0)
            s = self.build.const('scale8', np.array(scale, np.float32))
            z = self.build.const('zero8', np.array(0, dtype))
            qnode.input.extend([s, z])
            dnode.input.extend([s, z])


def _drop_unused(graph) -> None:
    """Remove Constant / Identity nodes whose outputs nothing reads."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [
            n for n in graph.node
            if n.op_type in ('Constant',
                             'Identity') and not any(o in used
                                                     for o in n.output)
        ]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def integerize(proto, layers: Mapping[str, dict],
               ranges: Callable[[Sequence[str]], Dict[str, tuple]]) -> dict:
    """Rewrite a finalized float-compute QDQ graph (in place) so that
    onnxruntime runs its quantized convolutions on integer kernels.

    Args:
        proto (onnx.ModelProto): Finalized by ``finalize_qdq_model``.
        layers: ``qdq_layer_info`` of the exported module.
        ranges: Called once with the names of the float tensors that get
            an 8-bit point; returns ``name -> (min, max)`` measured on
            calibration inputs (in the graph before the rewrite, where
            these tensors have the same names and values).

    Returns:
        dict: ``integer_layers`` (names), ``added_points`` (the tensors that
        got an 8-bit quantization point the PyTorch model does not have).

    Raises:
        RuntimeError: naming the layer whose pattern is not as expected.
    """
    rw = _Rewriter(proto, layers, ranges)
    convs, outputs = [], []
    for name in integer_layers(layers):
        out = rw.fold_conv(name, layers[name])
        if out is not None:
            convs.append(name)
            outputs.append(out)
    for out in outputs:
        rw.requantize(out)
    rw.residual_adds()
    rw.unsigned_containers()
    rw.calibrate()
    rw.signed_in_uint8()
    _drop_unused(proto.graph)
    used = {i for n in proto.graph.node for i in n.input}
    keep = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    return dict(integer_layers=convs, added_points=list(rw.added_points))


def check_integer_model(proto, layers: Mapping[str, dict],
                        names: Sequence[str]) -> None:
    """Check the rewritten graph: the ONNX checker passes, only standard
    ops; each integer conv ``names`` (a Conv node of that name) reads
    ``DequantizeLinear`` of its int8 codes (its layer's codes times its
    code multiplier, per channel up to sign, so on the b-bit grid), of an
    int32 bias, and of an input
    whose scale is the layer's activation scale and whose codes are held to
    the layer's ``n`` levels (an integer Clip, or the container's own
    range when ``n`` fills it).

    Raises:
        RuntimeError: naming the layer at fault.
    """
    import onnx
    onnx.checker.check_model(proto)
    graph = proto.graph
    foreign = sorted({n.domain for n in graph.node} - set(_STANDARD_DOMAINS))
    if foreign:
        raise RuntimeError(f'the graph uses custom op domains {foreign}')
    consts = constants(graph)
    producer = {o: n for n in graph.node for o in n.output}
    convs = {n.name: n for n in graph.node if n.op_type == 'Conv'}
    for name in names:
        info = layers[name]
        conv = convs.get(name)
        if conv is None or len(conv.input) < 3:
            raise RuntimeError(f'{name}: no Conv with a bias in the integer '
                               'graph')
        dq_x, dq_w, dq_b = (producer.get(i) for i in conv.input[:3])
        if any(d is None or d.op_type != 'DequantizeLinear'
               for d in (dq_x, dq_w, dq_b)):
            raise RuntimeError(f'{name}: input, weight and bias must each '
                               'come from a DequantizeLinear')
        codes = consts.get(dq_w.input[0])
        expected = info['codes'].numpy().astype(np.int64)
        if codes is None or codes.dtype != np.int8:
            raise RuntimeError(f'{name}: weight is not an int8 initializer')
        per_channel = np.abs(codes.astype(np.int64)).reshape(len(codes), -1)
        n = weight_levels(info['w_bits'])
        m = _multiplier(info)
        if not np.array_equal(per_channel,
                              m * np.abs(expected).reshape(len(codes), -1)) \
                or per_channel.max(initial=0) > m * n:
            raise RuntimeError(f'{name}: int8 weight codes differ from the '
                               f'layer\'s {info["w_bits"]}-bit codes')
        if consts.get(dq_b.input[0]) is None or \
                consts[dq_b.input[0]].dtype != np.int32:
            raise RuntimeError(f'{name}: bias is not an int32 initializer')
        scale = np.float32(consts[dq_x.input[1]])
        if scale != np.float32(info['act_scale']):
            raise RuntimeError(
                f'{name}: input scale {scale:g} differs from the layer\'s '
                f'activation scale {info["act_scale"]:g}')
        zero = consts[dq_x.input[2]]
        # a signed grid sits in uint8 around zero point 128
        offset = 128 if info['signed'] and zero.dtype == np.uint8 else 0
        top = int(np.iinfo(zero.dtype).max) - offset
        levels = int(round(info['act_range'] / info['act_scale']))
        src = producer.get(dq_x.input[0])
        if src is not None and src.op_type == 'Clip' and \
                src.input[2] in consts:  # integer Clip on the codes
            top = int(consts[src.input[2]]) - offset
        elif src is not None and src.op_type == 'QuantizeLinear':
            clip = producer.get(src.input[0])  # float Clip to [lo, r]
            if clip is not None and clip.op_type == 'Clip' and \
                    clip.input[2] in consts and np.float32(
                        consts[clip.input[2]]) == np.float32(
                            info['act_range']):
                top = levels
        if top != levels or np.any(zero != offset):
            raise RuntimeError(
                f'{name}: input codes are held to [.., {top}], not to the '
                f'{levels} levels of its {info["a_bits"]}-bit grid')
