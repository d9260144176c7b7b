"""kvplan: Llama-family decoder stacks to TensorRT engines with a flattened KV cache.

Stages, each a subpackage, in the order they run (none imports a later one):
``models`` (where a decoder comes from) -> ``export`` -> ``surgery`` -> ``trt``
(engines) -> ``validate``. ``target`` owns a build target's stages and state, and
``cli`` is the command line over it.
"""
__version__ = "0.1.0"
