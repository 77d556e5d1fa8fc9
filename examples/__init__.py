"""Runnable examples of using the pipeline output (not installed with the package)."""
