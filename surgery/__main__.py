"""python -m surgery: kvplan surgery from the repository root."""
import sys

from kvplan.surgery.cli import main

sys.exit(main())
