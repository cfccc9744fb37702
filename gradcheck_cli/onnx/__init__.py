"""ONNX graphs: forward statistics through onnxruntime, gradients through our own lowering.

``params`` is the parameter map (which stored tensors, initializers or Constant nodes, are
parameters, and which layer each reaches), ``ops`` is the operator registry (one torch function
per ONNX op and opset range), ``lower`` runs a graph with it under autograd, ``patterns``
recognises decomposed activations, ``plan`` decides the report rows and which parameters each
owns, ``ort_stats`` reads per-node statistics from onnxruntime in bounded groups, and ``run``
puts them together into a
:class:`gradcheck_cli.records.Report`. torch, onnx and onnxruntime are imported inside
functions only.
"""
