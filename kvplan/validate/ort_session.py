"""ONNX Runtime session options every validation session uses.

int4 graphs (DequantizeLinear(INT4) -> MatMul) are fused by ONNX Runtime's CPU provider into
MatMulNBits, which by default (accuracy level 4) quantizes the activations to int8 (about
0.6 % of the output's max error); accuracy level 0 keeps them in the graph's precision, which
a faithfulness check needs. The entry means nothing to graphs without int4 weights. Never
ORT_ENABLE_EXTENDED: with it, fp16 int4 graphs return all zeros (an ONNX Runtime defect).
"""
from __future__ import annotations

import onnxruntime as ort

INT4_ACCURACY_ENTRY = "session.qdq_matmulnbits_accuracy_level"


def session_options(threads: int = 0) -> ort.SessionOptions:
    """No memory arena either: ONNX Runtime's CPU arena keeps the largest point's activations
    (and, for fp16 graphs, the float32 weight casts it computes per run) reserved for the
    session's life; without it they are freed after each run."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.enable_cpu_mem_arena = False
    # kv_io = "inplace": ONNX Runtime warns on every TensorScatter that it copies the buffer.
    opts.log_severity_level = 3
    opts.add_session_config_entry(INT4_ACCURACY_ENTRY, "0")
    return opts


def session(path, threads: int = 0) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
