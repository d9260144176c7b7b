"""python -m kvplan: the kvplan command."""
import sys

from kvplan.cli import main

sys.exit(main())
