"""The single-sourced package version: pyproject.toml reads it, hsoftmax exports it."""

__version__ = "0.2.0"
