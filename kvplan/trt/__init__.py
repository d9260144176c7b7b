"""TensorRT / TensorRT-RTX engines from an exported decoder ONNX: build, inspect, run-check.

Modules: ``shapes`` (optimization-profile shapes), ``callbacks`` (logger, progress monitor),
``network`` (parsing, summary, contract check), ``options`` (builder config, timing cache),
``trtexec`` (equivalent command line), ``memory`` (memory figures), ``plan_io``
(deserialization), ``build`` (build_engine), ``inspection`` (inspect) and
``runtime_check`` (run_engine_check).
"""
from kvplan.lazy import lazy_import

# Each name from its module on first use: the backend's selection (kvplan.trt.backend) must not
# import the builder's modules.
_FROM = {"build_engine": "build", "BuildError": "errors", "inspect": "inspection", "onnx_weight_bytes": "memory",
         "check_network_inputs": "network", "layer_table": "network", "network_summary": "network",
         "load_timing_cache": "options", "save_timing_cache": "options", "timing_cache_supported": "options",
         "run_engine_check": "runtime_check", "shapes_for": "shapes", "trtexec_command": "trtexec"}
_MODULES = {name: lazy_import(f"kvplan.trt.{module}") for name, module in _FROM.items()}

__all__ = ["build_engine", "shapes_for", "inspect", "run_engine_check", "BuildError", "network_summary",
           "check_network_inputs", "layer_table", "trtexec_command", "timing_cache_supported",
           "load_timing_cache", "save_timing_cache", "onnx_weight_bytes"]


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(_MODULES[name], name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
