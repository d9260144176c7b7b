"""python -m kvplan.surgery: the surgery command."""
import sys

from kvplan.surgery.cli import main

sys.exit(main())
