"""The package version: read by setup.py without importing the package (that needs torch)."""

__version__ = "0.1.0"
