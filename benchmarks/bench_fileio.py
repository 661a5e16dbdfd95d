"""Throughput of fastckpt.fileio, native extension vs pure-Python fallback.

Run as ``python -m benchmarks.bench_fileio [--dir DIR] [--size-mib N]``. Writes a
scratch file (1 GiB by default) under DIR, which should be a real disk: on tmpfs
the cold O_DIRECT row means nothing or is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import mmap
import os
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np

from fastckpt import fileio

IMPLS = ("native", "fallback")


@contextlib.contextmanager
def implementation(name: str) -> Iterator[None]:
    """Select the native or the fallback path for the duration of the block."""
    old = os.environ.get("FASTCKPT_NO_NATIVE")
    os.environ["FASTCKPT_NO_NATIVE"] = "0" if name == "native" else "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["FASTCKPT_NO_NATIVE"]
        else:
            os.environ["FASTCKPT_NO_NATIVE"] = old


def best_gbps(size: int, run: Callable[[], None], repeats: int = 3) -> float:
    """Best of ``repeats`` runs, in GB/s (1e9 bytes per second)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return size / best / 1e9


def drop_cache(fd: int) -> None:
    # Clean pages of the file leave the page cache, so the next read hits the disk.
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def make_file(path: str, size: int) -> bytes:
    head = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for offset in range(0, size, len(head)):
            fileio.pwrite_all(fd, offset, head[: size - offset], threads=4)
        os.fsync(fd)
    finally:
        os.close(fd)
    return head


Row = tuple  # (label, native GB/s or None, fallback GB/s or None)


def warm_reads(path: str, out: np.ndarray) -> list[Row]:
    rows = []
    fd = os.open(path, os.O_RDONLY)
    try:
        fileio.pread_into(fd, 0, out, threads=4)  # warm the page cache
        for threads in (1, 2, 4):
            cells = []
            for impl in IMPLS:
                run = functools.partial(fileio.pread_into, fd, 0, out, threads=threads)
                with implementation(impl):
                    cells.append(best_gbps(out.nbytes, run))
            rows.append((f"pread_into warm, {threads} thread(s)", *cells))
    finally:
        os.close(fd)
    return rows


def cold_reads(path: str, out: np.ndarray) -> list[Row]:
    fd = os.open(path, os.O_RDONLY)
    dfd = fileio.open_direct(path)
    rows = []
    try:
        cells = []
        for impl in IMPLS:
            with implementation(impl):
                drop_cache(fd)
                run = functools.partial(fileio.pread_into, fd, 0, out, threads=4)
                cells.append(best_gbps(out.nbytes, run, repeats=1))
        rows.append(("pread_into cold, 4 threads", *cells))
        if dfd is None:
            return [*rows, ("pread_direct_into (O_DIRECT refused)", None, None)]
        for label, offset in (("aligned", 0), ("unaligned", 1)):
            # Direct reads bypass the page cache, so every run is cold.
            view = out[: out.nbytes - 4096]
            run = functools.partial(fileio.pread_direct_into, dfd, offset, view)
            cells = []
            for impl in IMPLS:
                with implementation(impl):
                    cells.append(best_gbps(view.nbytes, run, repeats=1))
            rows.append((f"pread_direct_into cold, {label}", *cells))
    finally:
        os.close(fd)
        if dfd is not None:
            os.close(dfd)
    return rows


def prefault_rows(path: str, size: int) -> list[Row]:
    cells = []
    with open(path, "rb") as f:
        for impl in IMPLS:

            def run() -> None:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    fileio.prefault(mm, threads=2)

            with implementation(impl):
                cells.append(best_gbps(size, run))
    return [("prefault mmap (warm file), 2 threads", *cells)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=".", help="directory for the scratch file")
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    if not fileio.native_available():
        print("fastckpt._native is not built: both columns measure the fallback")
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".bench-fileio-") as tmp:
        path = os.path.join(tmp, "data.bin")
        make_file(path, size)
        out = np.empty(size, dtype=np.uint8)
        out.fill(0)  # fault the destination in once, outside the timings
        rows = warm_reads(path, out) + prefault_rows(path, size) + cold_reads(path, out)
    print(f"{'operation (' + str(args.size_mib) + ' MiB, GB/s)':<40} {'native':>8} {'fallback':>9}")
    for label, *cells in rows:
        native, fallback = ("n/a" if c is None else f"{c:.2f}" for c in cells)
        print(f"{label:<40} {native:>8} {fallback:>9}")


if __name__ == "__main__":
    main()
