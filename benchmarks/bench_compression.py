"""End-to-end effect of compression on a save: time to durability without compression,
with ``compression="zstd"`` and with ``compression="auto"``, on this disk and on a
disk throttled to a network filesystem's write rate.

Run with ``python -m benchmarks.bench_compression [--throttle-mbs 200]``. The state is
built from real trained weights (all-MiniLM-L6-v2, see bench_codec), as bf16 weights
plus an fp32 master copy, repeated to ``--copies``; without the model package it
falls back to synthetic weights and says so.

The throttle wraps the writer's ``os.write``/``os.pwrite``/``os.fsync``: a link of the
given rate behind a 64 MiB write-back buffer, shared by all writer threads, so it
limits what reaches the disk, not the pipeline. The writer's O_DIRECT writes
(``fileio.pwrite_direct``) take the same link but bypass the buffer: each returns
once the link has carried it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time

import torch

from benchmarks.bench_codec import INSTALL_HINT, find_weights, load_weights
from fastckpt import benchmark as fb
from fastckpt import fileio, writer


def training_state(copies: int) -> tuple[dict, str]:
    """bf16 weights + fp32 master weights, ``copies`` times over; and their origin."""
    path = find_weights()
    if path is not None:
        weights, origin = load_weights(path), "all-MiniLM-L6-v2 (trained)"
    else:
        g = torch.Generator().manual_seed(0)
        weights = [torch.randn(1024, 1024, generator=g) * 0.02 for _ in range(22)]
        origin = f"synthetic normals ({INSTALL_HINT} for real weights)"
    state = {}
    for c in range(copies):
        for i, w in enumerate(weights):
            state[f"copy{c}.w{i}.bf16"] = w.to(torch.bfloat16)
            state[f"copy{c}.w{i}.fp32"] = w.clone()
    return state, origin


class Throttle:
    """Stands in for ``os`` in the writer: a disk that takes in at most ``rate`` bytes/s
    behind a write-back buffer of ``buffer`` bytes, as a network filesystem's client
    does. A write returns once the data queued before it fits in the buffer; an
    ``fsync`` once everything queued has drained. The link is shared by all writer
    threads."""

    def __init__(self, rate: float, buffer: int = 64 << 20) -> None:
        self.rate, self.buffer = rate, buffer
        self._lock, self._drained = threading.Lock(), time.monotonic()

    def _queue(self, n: int, buffered: bool = True) -> None:
        with self._lock:
            self._drained = max(self._drained, time.monotonic()) + n / self.rate
            until = self._drained - (self.buffer / self.rate if buffered else 0.0)
        time.sleep(max(0.0, until - time.monotonic()))

    def write(self, fd, data):
        self._queue(len(memoryview(data).cast("B")))
        return os.write(fd, data)

    def pwrite(self, fd, data, offset):
        self._queue(len(memoryview(data).cast("B")))
        return os.pwrite(fd, data, offset)

    def fsync(self, fd):
        with self._lock:
            until = self._drained
        time.sleep(max(0.0, until - time.monotonic()))
        return os.fsync(fd)

    def __getattr__(self, name):
        return getattr(os, name)


class ThrottledFileIO:
    """Stands in for ``fastckpt.fileio`` in the writer: O_DIRECT writes over the same
    link as a :class:`Throttle`, without its write-back buffer."""

    def __init__(self, throttle: Throttle) -> None:
        self._throttle = throttle

    def pwrite_direct(self, fd, offset, buf):
        self._throttle._queue(len(memoryview(buf).cast("B")), buffered=False)
        return fileio.pwrite_direct(fd, offset, buf)

    def __getattr__(self, name):
        return getattr(fileio, name)


MODES = ("none", "zstd", "auto")


def run(state: dict, workdir: str, throttle: float | None, reps: int) -> dict:
    """Median stall, time-to-durable and size on disk of each compression mode, the
    modes' saves interleaved (see fastckpt.benchmark.Bench.fastckpt_saves)."""
    real = writer.os, writer.fileio
    if throttle:
        link = Throttle(throttle)
        writer.os, writer.fileio = link, ThrottledFileIO(link)
    try:
        return fb.Bench(state, workdir, reps).fastckpt_saves(
            {m: {"compression": None if m == "none" else m} for m in MODES})
    finally:
        writer.os, writer.fileio = real


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=2, help="repetitions of the weights")
    p.add_argument("--throttle-mbs", type=float, default=200.0, help="throttled write MB/s")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--dir", default=None, help="directory on the disk to measure")
    args = p.parse_args()
    state, origin = training_state(args.copies)
    n = sum(t.numel() * t.element_size() for t in state.values())
    print(f"state: {len(state)} tensors, {n / 1e6:.0f} MB, weights: {origin}")
    tmp = tempfile.mkdtemp(prefix=".fastckpt-bench-", dir=args.dir or os.getcwd())
    try:
        rows = [("this disk", run(state, tmp, None, args.reps)),
                (f"throttled to {args.throttle_mbs:.0f} MB/s",
                 run(state, tmp, args.throttle_mbs * 1e6, args.reps))]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n| disk | compression | on-disk / raw | stall s | durable s | speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for disk, r in rows:
        for c in MODES:
            x = r[c]
            print(f"| {disk} | {c} | {x['disk_bytes'] / n:.3f} | {x['stall_s']:.3f} | "
                  f"{x['total_s']:.2f} | {r['none']['total_s'] / x['total_s']:.2f}x |")


if __name__ == "__main__":
    main()
