"""Multi-rank saves: aggregate durable throughput and per-rank stall, 1 vs N ranks.

Run as ``python -m benchmarks.bench_dist [--size-mib 1024] [--ranks 1 2 4] [--dir DIR]``.
Every rank holds the same replicated training state (as under DDP) and saves it
into one checkpoint; fastckpt splits the writing across the ranks. Measured in
one run on the same disk: raw sequential write + fsync of the same byte count
(the single-writer disk limit), then for each rank count the time from the
ranks' (barrier-aligned) ``save`` calls to the commit, and each rank's stall.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from fastckpt import benchmark as fb

MiB = 1 << 20


def worker(rank: int, world: int, workdir: str, nbytes: int, reps: int) -> None:
    """One rank: save the replicated state ``reps`` times (after one warm-up) and
    print its stalls and durable times as JSON."""
    import torch.distributed as dist

    import fastckpt

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=600))
    sync = dist.barrier if world > 1 else lambda: None
    state = fb.model_like_state(nbytes)  # same seed on every rank: replicated
    path = os.path.join(workdir, "ckpt")
    stalls, totals = [], []
    with fastckpt.Checkpointer() as c:
        for i in range(reps + 1):
            if rank == 0 and os.path.exists(path):
                shutil.rmtree(path)
            sync()
            r = c.save(state, path).wait()
            if i:
                stalls.append(r.stall_s)
                totals.append(r.total_s)
    sync()
    print(json.dumps({"rank": rank, "stall_s": stalls, "total_s": totals}), flush=True)


def run_ranks(world: int, workdir: str, nbytes: int, reps: int) -> dict:
    """Launch ``world`` ranks; the wall time of a save is its slowest rank's."""
    d = tempfile.mkdtemp(prefix=f"ranks{world}-", dir=workdir)
    cmd = [sys.executable, "-m", "benchmarks.bench_dist", "--worker"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(cmd + [str(r), str(world), d, str(nbytes), str(reps)],
                              stdout=subprocess.PIPE, env=env) for r in range(world)]
    outs = [json.loads(p.communicate()[0].decode().strip().splitlines()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a rank of the {world}-rank run failed")
    shutil.rmtree(d, ignore_errors=True)
    walls = [max(o["total_s"][i] for o in outs) for i in range(reps)]
    return {"ranks": world, "wall_s": statistics.median(walls),
            "stall_s_per_rank": [statistics.median(o["stall_s"]) for o in outs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024, help="state size (default 1 GiB)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default=None, help="directory on the disk to measure (default: cwd)")
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        rank, world, d, n, reps = args.worker
        worker(int(rank), int(world), d, int(n), int(reps))
        return
    nbytes = args.size_mib * MiB
    workdir = tempfile.mkdtemp(prefix=".fastckpt-bench-dist-", dir=args.dir or os.getcwd())
    try:
        state = fb.model_like_state(nbytes)
        n = fb.state_bytes(state)
        raw_s = fb.Bench(state, workdir, args.reps).raw_write()
        del state  # each rank builds its own
        print(f"state {n / MiB:.0f} MiB; raw write + fsync: {raw_s:.3f} s "
              f"({n / raw_s / 1e9:.2f} GB/s)")
        rows = [run_ranks(w, workdir, nbytes, args.reps) for w in args.ranks]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(report(n, raw_s, rows))


def report(n: int, raw_s: float, rows: list[dict]) -> str:
    """A markdown table: per rank count, aggregate throughput against the disk limit
    and the worst rank's stall against the single-rank stall."""
    one = next((r for r in rows if r["ranks"] == 1), rows[0])
    base_stall = max(one["stall_s_per_rank"])
    lines = ["| ranks | durable wall s | GB/s | / raw write | max stall s | / 1-rank stall |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        stall = max(r["stall_s_per_rank"])
        lines.append(f"| {r['ranks']} | {r['wall_s']:.3f} | {n / r['wall_s'] / 1e9:.2f} | "
                     f"{raw_s / r['wall_s']:.2f} | {stall:.3f} | {stall / base_stall:.2f} |")
    lines.append("")
    lines.append("targets: throughput / raw write >= 0.9; stall / 1-rank stall <= 1.0")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
