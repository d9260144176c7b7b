"""One module per fusion pass; surgery/registry.py lists them in the order they run."""
