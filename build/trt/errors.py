"""The one exception the TensorRT build raises for problems it can name (file, input, option)."""


class BuildError(RuntimeError):
    pass
