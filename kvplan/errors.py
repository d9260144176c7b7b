"""One exception root for everything kvplan reports to a user.

The CLI catches ``KvplanError`` once: its message is printed on one line and the
exit code is 2. Anything else that escapes is a bug and keeps its traceback.
Each stage raises its own named subclass so callers and tests can tell them apart.
"""
from __future__ import annotations


class KvplanError(Exception):
    """A problem with the user's input or environment; the message names the file, field or tensor."""


class UserError(KvplanError):
    """A command-line argument that cannot be acted on."""


class ConfigError(KvplanError, ValueError):
    """A model configuration kvplan cannot export; the message names the source and field."""


class ModelError(KvplanError, ValueError):
    """A model that cannot be loaded; the message names the file, tensor or field."""


class ProfileError(KvplanError, ValueError):
    """A build profile that does not validate; the message names the file and field."""


class WriteError(KvplanError, OSError):
    """An artifact the disk refused (full, read-only, over quota); the message names the file and
    its directory. Still an OSError, so code that tolerates failed writes does."""


class ExportError(KvplanError, RuntimeError):
    """The export stage could not write a graph."""


class QuantizeError(KvplanError, ValueError):
    """Quantization settings or inputs that cannot be used; the message names the file and tensor."""


class GraphError(KvplanError, ValueError):
    """An ONNX file that cannot be read, or that holds no graph the stage can work on."""


class SurgeryError(KvplanError, RuntimeError):
    """The graph failed a check after surgery; nothing is emitted."""


class OpsetError(KvplanError, RuntimeError):
    """A graph whose opset cannot be raised to the fused ops' opset."""


class BackendError(KvplanError, RuntimeError):
    """No usable TensorRT backend for what was asked."""


class BuildError(KvplanError, RuntimeError):
    """TensorRT could not build, load or run an engine."""


class ChildExitError(KvplanError, RuntimeError):
    """A stage's own process ended without handing back a result: killed (out of memory) or crashed."""
