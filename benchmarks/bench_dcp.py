"""torch.distributed.checkpoint with fastckpt's storage against DCP's FileSystemWriter.

Run as ``python -m benchmarks.bench_dcp [--size-mib 1024] [--reps 3] [--dir DIR]``.
One process saves the same flat training state through ``dcp.save`` and
``dcp.async_save`` with each storage writer, in one run, on the same disk, and
reports the time the caller is blocked, the time until the checkpoint is durable
(both writers fsync), and their ratios. Each figure is the median of ``reps``
saves after one warm-up save with the same writer object.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch.distributed.checkpoint as dcp

from fastckpt import benchmark as fb
from fastckpt.dcp import Writer

MiB = 1 << 20


def _timed(save: Callable[[], object], path: str, reps: int) -> dict:
    """Median blocking and durable seconds of ``save`` (which returns a future for
    an asynchronous save, anything else for a blocking one)."""
    blocks, totals = [], []
    for i in range(reps + 1):
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        fut = save()
        t1 = time.perf_counter()
        if hasattr(fut, "result"):
            fut.result()
        if i:
            blocks.append(t1 - t0)
            totals.append(time.perf_counter() - t0)
    shutil.rmtree(path, ignore_errors=True)
    return {"blocking_s": statistics.median(blocks), "durable_s": statistics.median(totals)}


def run(state: dict, workdir: str, reps: int = 3) -> dict:
    """Measure both writers with ``dcp.save`` and ``dcp.async_save``."""
    out: dict = {"nbytes": fb.state_bytes(state),
                 "raw_write_s": fb.Bench(state, workdir, reps).raw_write()}  # the disk limit
    fs_path, fc_path = os.path.join(workdir, "fs"), os.path.join(workdir, "fc")
    fs = dcp.FileSystemWriter(fs_path)
    with warnings.catch_warnings(), Writer(fc_path) as fc:
        warnings.simplefilter("ignore")  # DCP: "assuming the intent is to save in a single process"
        out["fs_save"] = _timed(lambda: dcp.save(state, storage_writer=fs), fs_path, reps)
        out["fc_save"] = _timed(lambda: dcp.save(state, storage_writer=fc), fc_path, reps)
        out["fs_async"] = _timed(lambda: dcp.async_save(state, storage_writer=fs), fs_path, reps)
        out["fc_async"] = _timed(lambda: dcp.async_save(state, storage_writer=fc), fc_path, reps)
    out["ratios"] = {
        "save_throughput_over_fs": out["fs_save"]["durable_s"] / out["fc_save"]["durable_s"],
        "async_throughput_over_fs": out["fs_async"]["durable_s"] / out["fc_async"]["durable_s"],
        "async_blocking_over_fs": out["fc_async"]["blocking_s"] / out["fs_async"]["blocking_s"],
        "save_blocking_over_fs": out["fc_save"]["blocking_s"] / out["fs_save"]["blocking_s"],
        "save_throughput_over_raw_write": out["raw_write_s"] / out["fc_save"]["durable_s"],
    }
    return out


def report(r: dict) -> str:
    """Markdown tables of one run."""
    n = r["nbytes"]
    lines = ["| writer / call | blocking s | durable s | durable GB/s |", "|---|---:|---:|---:|",
             f"| raw write + fsync (disk limit) | | {r['raw_write_s']:.3f} | "
             f"{n / r['raw_write_s'] / 1e9:.2f} |"]
    for key, name in (("fs_save", "FileSystemWriter, dcp.save"),
                      ("fc_save", "fastckpt Writer, dcp.save"),
                      ("fs_async", "FileSystemWriter, dcp.async_save"),
                      ("fc_async", "fastckpt Writer, dcp.async_save")):
        m = r[key]
        lines.append(f"| {name} | {m['blocking_s']:.3f} | {m['durable_s']:.3f} | "
                     f"{n / m['durable_s'] / 1e9:.2f} |")
    q = r["ratios"]
    lines += ["", "| ratio (fastckpt vs FileSystemWriter) | measured | target | met |",
              "|---|---:|---:|:---:|"]
    for key, target, ok in (("save_throughput_over_fs", ">= 2", q["save_throughput_over_fs"] >= 2),
                            ("async_throughput_over_fs", ">= 2",
                             q["async_throughput_over_fs"] >= 2),
                            ("async_blocking_over_fs", "<= 0.2", q["async_blocking_over_fs"] <= .2),
                            ("save_blocking_over_fs", "<= 0.2", q["save_blocking_over_fs"] <= .2)):
        lines.append(f"| {key} | {q[key]:.2f} | {target} | {'yes' if ok else 'NO'} |")
    lines.append(f"| save_throughput_over_raw_write | {q['save_throughput_over_raw_write']:.2f} "
                 "| (context) | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024, help="state size (default 1 GiB)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default=None, help="directory on the disk to measure (default: cwd)")
    args = p.parse_args()
    state = fb.flat_state(fb.model_like_state(args.size_mib * MiB))
    workdir = tempfile.mkdtemp(prefix=".fastckpt-bench-dcp-", dir=args.dir or os.getcwd())
    try:
        r = run(state, workdir, args.reps)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"state: {len(state)} tensors, {r['nbytes'] / MiB:.0f} MiB")
    print(report(r))


if __name__ == "__main__":
    main()
