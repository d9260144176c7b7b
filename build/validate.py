"""python -m build.validate: kvplan validate under its repository-root name."""
import sys

from kvplan.cli import validate_main

if __name__ == "__main__":
    sys.exit(validate_main(prog="python -m build.validate"))
