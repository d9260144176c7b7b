"""Export stage: kvplan's decoder module -> ONNX with a flattened KV cache.

Modules: ``exporter`` (one pack of layers to one ONNX file, the I/O contract),
``stitch`` (trace three pieces once, assemble the stack from copies) and
``trace_cache`` (traced pieces kept on disk between builds).
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
