"""Int4 weight-only quantization of the decoder's linears (between export and surgery).

``rtn`` (round to nearest) and ``awq`` quantize kvplan's own decoder, layer by layer
(kvplan.quantize.rtn, .awq, .calibration); ``checkpoint`` imports an AutoAWQ or GPTQ
checkpoint's own int4 values without requantizing them. ``graph`` rewrites the exported
graph's MatMuls into the one int4 form TensorRT-RTX and ONNX Runtime both accept:
``DequantizeLinear(w INT4 [K, N], scale [K/G, N], axis=0, block_size=G) -> MatMul``.

Nothing is imported here: the profile loader reads ``kvplan.quantize.settings``, and engine
builds (which load profiles) must not pull torch in through this package.
"""
