"""Deployment: the fixed-bit network as files other runtimes read.

Plain torch / numpy / onnx (floor 1: nothing from mmengine or mmpretrain);
the entry points that read configs and checkpoints are in
:mod:`gmpq_mm.apis.onnx_export` and :mod:`gmpq_mm.apis.deploy`.

* :mod:`.qdq_modules`: export-time stand-ins of the quantized layers (plain
  torch ops the ONNX exporter can trace) and the float twin of a network;
* :mod:`.onnx_graph`: the float-compute QDQ graph (int8 weight codes) and
  its checks;
* :mod:`.onnx_integer`: the rewrite of that graph into one onnxruntime runs
  on integer kernels (BatchNorm folded, outputs requantized);
* :mod:`.ort_check`: onnxruntime runs, comparisons and the optimized graph.
"""
