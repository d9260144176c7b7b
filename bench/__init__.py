"""kvplan benchmark harness: `python -m bench.run` regenerates every table under bench/results/."""
