"""Export stage: a decoder's layers -> ONNX with a flattened KV cache.

Modules: ``exporter`` (one pack of layers to one ONNX file, the I/O contract, the weights'
checks), ``emit`` (the graph written op by op) and ``stage`` (the pipeline stage).
"""
from kvplan.lazy import lazy_import

# The exporter's names, imported on first use: the stage module (kvplan.export.stage) and the pure
# contract helpers (kvplan.stack) must be importable without torch.
_exporter = lazy_import("kvplan.export.exporter")

__all__ = ["export_pack", "io_contract", "input_names", "output_names", "example_inputs", "causal_mask",
           "kv_shape", "TORCH_DTYPES", "pack_file_names", "PackExport"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(_exporter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
