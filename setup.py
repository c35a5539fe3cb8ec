"""Shim for tools that still call setup.py (Debian's pybuild distutils plugin); metadata is in pyproject.toml."""
from setuptools import setup

setup()
