"""Benchmarks for fastckpt (run each as ``python -m benchmarks.NAME``)."""
