"""python -m build.engines: kvplan's pipeline CLI (kvplan build) under the name the product card gives."""
import sys

from kvplan.cli import build_main

if __name__ == "__main__":
    sys.exit(build_main(prog="python -m build.engines"))
