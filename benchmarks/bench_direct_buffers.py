"""O_DIRECT writes gathered through a reused buffer: huge pages vs ordinary pages.

The shard writer copies encoded payloads (and any bytes not aligned for O_DIRECT)
into one reused buffer and writes it out in 8 MiB requests. This measures that
loop with the buffer from ``fileio.io_buffer`` (huge pages where the kernel allows)
against ordinary anonymous memory, and, where the kernel exposes the device's
counters, the mean size of the requests that reached the device.

Run as ``python -m benchmarks.bench_direct_buffers [--dir DIR] [--size-mib N]
[--rounds R]``; DIR must be on a filesystem that accepts O_DIRECT.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import tempfile
import time

import numpy as np

from fastckpt import fileio
from fastckpt.writer import PACE_STEP


def device_writes(path: str) -> tuple[int, int] | None:
    """(write requests completed, sectors written) of the block device holding
    ``path``, or None where /sys does not say."""
    dev = os.stat(path).st_dev
    try:
        with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat") as f:
            fields = f.read().split()
    except OSError:
        return None
    return int(fields[4]), int(fields[6])


def gathered_write(path: str, src: memoryview, buf: memoryview) -> tuple[float, float | None]:
    """Copy ``src`` through ``buf`` into a new file with O_DIRECT, then fsync.
    Returns (seconds, mean device request in KiB or None)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    dfd = fileio.open_direct(path, write=True)
    before = device_writes(path)
    start = time.perf_counter()
    try:
        for offset in range(0, len(src), len(buf)):
            n = min(len(buf), len(src) - offset)
            buf[:n] = src[offset : offset + n]
            fileio.pwrite_direct(dfd, offset, buf[:n])
        os.fsync(fd)
        seconds = time.perf_counter() - start
    finally:
        os.close(dfd)
        os.close(fd)
    after = device_writes(path)
    os.remove(path)
    if before is None or after is None or after[0] == before[0]:
        return seconds, None
    return seconds, (after[1] - before[1]) * 512 / (after[0] - before[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=".", help="directory for the scratch file")
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    size = args.size_mib << 20
    # The source is ordinary memory, as a model's tensors are, allocated first: how
    # scattered ordinary pages are depends on what the process did before.
    src = memoryview(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8))
    buffers = {
        "fileio.io_buffer": fileio.io_buffer(PACE_STEP),
        "ordinary pages": memoryview(mmap.mmap(-1, PACE_STEP, flags=mmap.MAP_PRIVATE)),
    }
    runs: dict[str, list] = {name: [] for name in buffers}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".bench-direct-") as tmp:
        path = os.path.join(tmp, "data.bin")
        probe = fileio.open_direct(path, write=True)
        if probe is None:
            raise SystemExit(f"{args.dir}: the filesystem refuses O_DIRECT")
        os.close(probe)
        for r in range(args.rounds):
            for name in sorted(buffers, reverse=bool(r % 2)):  # alternate the order
                runs[name].append(gathered_write(path, src, buffers[name]))
    print(f"{args.size_mib} MiB in {PACE_STEP >> 20} MiB O_DIRECT writes + fsync, "
          f"median of {args.rounds} interleaved rounds")
    print(f"| {'gather buffer':<18} | seconds | GB/s | mean device request KiB |")
    print("|---|---:|---:|---:|")
    for name, rs in runs.items():
        seconds = statistics.median(s for s, _ in rs)
        kib = [k for _, k in rs if k is not None]
        req = f"{statistics.median(kib):.0f}" if kib else "n/a"
        print(f"| {name:<18} | {seconds:.3f} | {size / seconds / 1e9:.2f} | {req} |")


if __name__ == "__main__":
    main()
