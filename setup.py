"""Build hook for the optional C++ extension; all metadata lives in pyproject.toml."""

from setuptools import setup

setup()
