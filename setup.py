"""Build hook for the optional C++ extension; all metadata lives in pyproject.toml.

The extension is optional: without a working compiler the build warns and fastckpt
falls back to its pure-Python I/O (fastckpt/fileio.py) and codec kernels
(fastckpt/codec.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fastckpt._native",
            ["native/fastckpt_native.cpp"],
            depends=["native/codec.h"],
            extra_compile_args=["-O3", "-std=c++17"],
            language="c++",
            optional=True,
        )
    ]
)
