"""fastckpt's save options against each other, with more repetitions than ``make bench``.

Run as ``python -m benchmarks.bench_save_variants [--size-gib 1.0] [--reps 9] [--dir DIR]``.
Saves the default state with checksums (the default), without, through the page
cache instead of O_DIRECT (``direct_io=False``), with ``compression="zstd"`` and
with ``compression="auto"``, in interleaved rounds of
shuffled order (``fastckpt.benchmark.Bench.fastckpt_saves``), and reports each
variant's median stall and time to durable, and their ratio to the default. On a
disk whose speed swings from one save to the next, more rounds are what settles
ratios near 1, such as the cost of checksums.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from fastckpt import benchmark as fb

VARIANTS = {"default (xxh3)": {}, "no checksum": {"checksum": None},
            "through the page cache": {"direct_io": False},
            "zstd": {"compression": "zstd"}, "auto": {"compression": "auto"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--dir", default=None, help="directory on the disk to measure")
    args = p.parse_args()
    state = fb.model_like_state(int(args.size_gib * fb.GiB))
    n = fb.state_bytes(state)
    tmp = tempfile.mkdtemp(prefix=".fastckpt-bench-", dir=args.dir or os.getcwd())
    try:
        names = {name: f"v{i}" for i, name in enumerate(VARIANTS)}
        r = fb.Bench(state, tmp, args.reps).fastckpt_saves(
            {names[k]: v for k, v in VARIANTS.items()})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = r[names["default (xxh3)"]]["total_s"]
    print(f"{n / fb.GiB:.2f} GiB, median of {args.reps} interleaved rounds\n")
    print("| save | stall s | durable s | GB/s | durable / default |")
    print("|---|---:|---:|---:|---:|")
    for name, key in names.items():
        x = r[key]
        print(f"| {name} | {x['stall_s']:.3f} | {x['total_s']:.3f} | "
              f"{n / x['total_s'] / 1e9:.2f} | {x['total_s'] / base:.2f} |")


if __name__ == "__main__":
    main()
