"""The repository root's ``python -m surgery`` entry: kvplan's graph surgery (``kvplan.surgery``).

Nothing here is installed; ``kvplan surgery`` is the same command from anywhere.
"""
from kvplan.surgery import PASSES, fuse_file, run, summary_lines  # noqa: F401
