"""Validation stage: Polygraphy comparisons of every built artifact against transformers.

Modules: ``points`` (which shapes, and realistic inputs from a real prefill),
``runners`` (Polygraphy runners: PyTorch reference, ONNX Runtime, TensorRT),
``compare`` (elementwise atol/rtol verdict per output), ``task`` (token
agreement and multi-step drift), ``report`` (table, manifest record).
"""
