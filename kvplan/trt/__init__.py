"""TensorRT / TensorRT-RTX engines from an exported decoder ONNX: build, inspect, run-check.

Modules: ``shapes`` (optimization-profile shapes), ``callbacks`` (logger, progress monitor),
``network`` (parsing, summary, contract check), ``options`` (builder config, timing cache),
``trtexec`` (equivalent command line), ``memory`` (memory figures), ``plan_io``
(deserialization), ``build`` (build_engine), ``inspection`` (inspect) and
``runtime_check`` (run_engine_check).
"""
from kvplan.trt.build import build_engine
from kvplan.trt.errors import BuildError
from kvplan.trt.inspection import inspect
from kvplan.trt.memory import onnx_weight_bytes
from kvplan.trt.network import check_network_inputs, layer_table, network_summary
from kvplan.trt.options import load_timing_cache, save_timing_cache, timing_cache_supported
from kvplan.trt.runtime_check import run_engine_check
from kvplan.trt.shapes import shapes_for
from kvplan.trt.trtexec import trtexec_command

__all__ = ["build_engine", "shapes_for", "inspect", "run_engine_check", "BuildError", "network_summary",
           "check_network_inputs", "layer_table", "trtexec_command", "timing_cache_supported",
           "load_timing_cache", "save_timing_cache", "onnx_weight_bytes"]
