#!/usr/bin/env bash
# Install the peer exporters in their own venvs (never in kvplan's): torch's CPU build first so pip
# does not pull a multi-GB CUDA build. optimum-onnx 0.1 pins transformers 4.x, while
# onnxruntime-genai 0.18's builder imports transformers 5.x classes (Qwen3_5ForConditionalGeneration)
# and needs onnx-ir, so each gets its own venv. Optimum's exporter needs onnx and onnxruntime
# to fix the graph's dynamic shapes; optimum-onnx does not depend on them, so they are named here.
# A venv missing any of them is completed rather than trusted because its CLI exists.
# GEN-ml_dtypes-0.6 holds ml_dtypes 0.6.0 alone: bench.run's second GenAI row puts it ahead of the
# venv's own (0.7.0 imports in 0.6-0.9 s; kvplan caps it below 0.7), so that row pays what kvplan pays.
set -euo pipefail
OPT=${KVPLAN_BENCH_PEERS_VENV:-/tmp/peers}
GEN=${KVPLAN_BENCH_GENAI_VENV:-/tmp/peers-genai}
[ -x "$OPT/bin/python" ] || { python3 -m venv "$OPT" && "$OPT/bin/pip" install torch==2.13.0; }
"$OPT/bin/python" -c "import optimum.exporters.onnx, onnx, onnxruntime" 2>/dev/null ||
  "$OPT/bin/pip" install optimum-onnx onnx onnxruntime
[ -x "$GEN/bin/python" ] && "$GEN/bin/python" -c "import onnxruntime_genai.models.builder" 2>/dev/null || {
  python3 -m venv "$GEN" && "$GEN/bin/pip" install torch==2.13.0 && "$GEN/bin/pip" install onnxruntime-genai onnx-ir transformers onnx; }
[ -d "$GEN-ml_dtypes-0.6/ml_dtypes" ] ||
  "$GEN/bin/pip" install --no-deps --target "$GEN-ml_dtypes-0.6" ml_dtypes==0.6.0
