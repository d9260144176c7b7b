"""ONNX Runtime session options every validation session uses.

int4 graphs (DequantizeLinear(INT4) -> MatMul) are fused by ONNX Runtime's CPU provider into
MatMulNBits, which by default (accuracy level 4) quantizes the activations to int8 (about
0.6 % of the output's max error); accuracy level 0 keeps them in the graph's precision, which
a faithfulness check needs. The entry means nothing to graphs without int4 weights. Never
ORT_ENABLE_EXTENDED: with it, fp16 int4 graphs return all zeros (an ONNX Runtime defect).

Validation sessions optimize at ORT_ENABLE_BASIC. ONNX Runtime's CPU provider has no fp16
MatMul on x86, so it casts the weights to float32; above the basic level it folds those
casts into float32 copies of every weight (and prepacks them) when the session is created:
the default fp16 graph's session held 1008 MiB of its 376 MiB file, at the basic level 376
MiB (the weights once; the casts run per inference and their results are freed). Disabling
ConstantFolding alone changes nothing. Outputs: within one fp16 step of the default level's
(worst |d| 0.0039 on hidden_out at N = 512, lastSum = 3584), about the same CPU time per
run. The basic level is also the more literal reading of the graph (no ONNX Runtime
fusions), which is what a check of the graph wants. int4 graphs: without the level-2 QDQ
fusion the DequantizeLinear nodes run as written (float weights per inference, freed after).
By default ONNX Runtime runs the casts before anything else (they depend on nothing), so every
float32 copy is alive at once; ordered by priority, each runs beside the MatMul it feeds and is
freed after it. The default fp16 graph (decoder.fused.onnx, 2 threads; `python -m
bench.ort_latency GRAPH --session ...`, bench/results/ort_session_order-2026-12-03.json): a
decode step at lastSum = 302 takes 52 ms with a 494 MiB peak by priority, 193 ms and 991 MiB in
the default order, 37 ms and 859 MiB with the casts folded; a 303-token prefill peaks at 530 MiB
by priority, 1370 MiB in the default order. The outputs are bit-identical in either order
(tests/test_ort_session.py). Callers driving many steps (the task check, kvplan eval, kvplan
generate) ask for ``fold_casts``: the default level.
"""
from __future__ import annotations

from kvplan.lazy import lazy_import

ort = lazy_import("onnxruntime")

INT4_ACCURACY_ENTRY = "session.qdq_matmulnbits_accuracy_level"


def session_options(threads: int = 0, fold_casts: bool = False, int4_accuracy: int = 0) -> ort.SessionOptions:
    """No memory arena either: ONNX Runtime's CPU arena keeps the largest point's activations
    (and, for fp16 graphs, the float32 weight casts it computes per run) reserved for the
    session's life; without it they are freed after each run."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.enable_cpu_mem_arena = False
    if not fold_casts:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        # The default order runs every weight's cast first (they depend on nothing), so all the
        # float32 copies are alive at once; by priority, each cast runs next to its consumer.
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    # kv_io = "inplace": ONNX Runtime warns on every TensorScatter that it copies the buffer.
    opts.log_severity_level = 3
    opts.add_session_config_entry(INT4_ACCURACY_ENTRY, str(int4_accuracy))
    return opts


def session(path, threads: int = 0, fold_casts: bool = False) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(threads, fold_casts), providers=["CPUExecutionProvider"])
