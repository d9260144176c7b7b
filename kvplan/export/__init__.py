"""Export stage: kvplan's decoder module -> ONNX with a flattened KV cache.

Modules: ``exporter`` (one pack of layers to one ONNX file, the I/O contract),
``stitch`` (trace three pieces once, assemble the stack from copies) and
``trace_cache`` (traced pieces kept on disk between builds).
"""
from kvplan.export.exporter import (
                                    TORCH_DTYPES,
                                    PackExport,
                                    causal_mask,
                                    example_inputs,
                                    export_pack,
                                    input_names,
                                    io_contract,
                                    kv_shape,
                                    output_names,
                                    pack_file_names,
)

__all__ = ["export_pack", "io_contract", "input_names", "output_names", "example_inputs", "causal_mask",
           "kv_shape", "TORCH_DTYPES", "pack_file_names", "PackExport"]
