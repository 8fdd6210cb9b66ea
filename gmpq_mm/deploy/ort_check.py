"""onnxruntime checks of an exported model: run it, compare it with
PyTorch, count what its optimized graph runs.

Needs ``onnxruntime`` (the ``[deploy]`` extra), imported lazily.
"""
from typing import Optional

import numpy as np

__all__ = [
    'missing_deploy_packages', 'run_onnxruntime', 'open_session',
    'optimized_nodes', 'tensor_ranges', 'compare_logits'
]


def missing_deploy_packages(with_runtime: bool = True) -> list:
    """Names of the ``[deploy]`` packages that cannot be imported."""
    missing = []
    names = ('onnx', 'onnxruntime') if with_runtime else ('onnx', )
    for name in names:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return missing


def run_onnxruntime(path: str,
                    inputs: np.ndarray,
                    optimize: bool = True,
                    threads: Optional[int] = None) -> np.ndarray:
    """Outputs of an ONNX file run by onnxruntime's CPU provider.

    Args:
        path: The ``.onnx`` file.
        inputs: The (float32) input batch.
        optimize: onnxruntime's graph optimizations (all) or none.
        threads: Intra-op threads (default onnxruntime's).
    """
    sess = open_session(path, optimize, threads)
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: np.ascontiguousarray(inputs, np.float32)})[0]


def open_session(path: str,
                 optimize: bool = True,
                 threads: Optional[int] = None,
                 optimized_path: Optional[str] = None):
    """An onnxruntime CPU session of ``path`` (all graph optimizations, or
    none); ``optimized_path`` saves the optimized graph there."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        opts.intra_op_num_threads = int(threads)
    if optimized_path:
        opts.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(
            str(path), opts, providers=['CPUExecutionProvider'])
    except Exception as err:  # onnxruntime's own error types
        raise RuntimeError(
            f'{path}: onnxruntime cannot load this model: {err}') from None


def optimized_nodes(path: str) -> list:
    """``(op_type, name)`` of every node of the graph onnxruntime's CPU
    provider runs after all its graph optimizations
    (``SessionOptions.optimized_model_filepath``)."""
    import os
    import tempfile

    import onnx
    folder = tempfile.mkdtemp(prefix='gmpq_ort_opt_')
    opt = os.path.join(folder, 'optimized.onnx')
    try:
        open_session(path, optimized_path=opt)
        graph = onnx.load(opt, load_external_data=False).graph
        return [(n.op_type, n.name) for n in graph.node]
    finally:
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)


def tensor_ranges(model_proto,
                  names,
                  inputs: np.ndarray,
                  batch_size: int = 32) -> dict:
    """``name -> (min, max)`` of intermediate tensors of ``model_proto``
    over ``inputs``, run by onnxruntime with optimizations off."""
    import onnx
    proto = onnx.ModelProto()
    proto.CopyFrom(model_proto)
    have = {o.name for o in proto.graph.output}
    for name in names:
        if name not in have:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        proto.SerializeToString(), opts, providers=['CPUExecutionProvider'])
    feed = sess.get_inputs()[0].name
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    for i in range(0, len(inputs), batch_size):
        batch = np.ascontiguousarray(inputs[i:i + batch_size], np.float32)
        outs = sess.run(list(names), {feed: batch})
        for name, value in zip(names, outs):
            lo[name] = min(lo[name], float(value.min()))
            hi[name] = max(hi[name], float(value.max()))
    return {n: (lo[n], hi[n]) for n in names}


def compare_logits(ref: np.ndarray, got: np.ndarray, tol: dict) -> dict:
    """Compare two logit batches against ``tol`` (``max_rel_l2``,
    ``min_top1_agreement``); also reports how many samples agree to float
    precision (``exact``: within 1e-4 of the largest logit)."""
    per_sample = np.abs(ref - got).reshape(len(ref), -1).max(1)
    rel_l2 = float(np.linalg.norm(ref - got) / max(np.linalg.norm(ref), 1e-12))
    agree = float(np.mean(ref.argmax(1) == got.argmax(1)))
    exact = float(np.mean(per_sample <= 1e-4 * np.abs(ref).max()))
    return dict(
        rel_l2=rel_l2,
        max_abs_diff=float(per_sample.max()),
        exact=exact,
        top1_agreement=agree,
        ok=rel_l2 <= tol['max_rel_l2'] and agree >= tol['min_top1_agreement'])
