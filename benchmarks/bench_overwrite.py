"""Saving over the previous checkpoint against saving to a fresh path.

Run as ``python -m benchmarks.bench_overwrite [--size-gib 1.0] [--reps 7] [--gap 1.0]
[--dir DIR]``. One engine saves the default state in interleaved rounds: once to a
path whose previous checkpoint was deleted beforehand (untimed), once over the
checkpoint already at another path, each after ``--gap`` seconds of idle time (as
between checkpoints in training). Reports the median time to durable of each, and,
for the overwrite, the time until the replaced checkpoint is gone as well
(``wait_all()``). Removing a replaced checkpoint costs the disk real time (unlinking
trims on a filesystem mounted with ``discard``): this shows whether the save's
handle waits for it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from fastckpt import Checkpointer
from fastckpt import benchmark as fb


def measure(state: dict, tmp: str, reps: int, gap: float) -> dict[str, list[float]]:
    fresh, over = os.path.join(tmp, "fresh"), os.path.join(tmp, "over")
    out: dict[str, list[float]] = {"fresh": [], "over": [], "over, replaced one gone": []}
    with Checkpointer() as engine:
        for path in (fresh, over):  # warm-up: staging buffers, and a checkpoint to replace
            engine.save(state, path).wait()
        for r in range(reps):
            for kind in ("fresh", "over") if r % 2 else ("over", "fresh"):
                if kind == "fresh":
                    shutil.rmtree(fresh)
                time.sleep(gap)
                t0 = time.perf_counter()
                out[kind].append(engine.save(state, fresh if kind == "fresh" else over)
                                 .wait().total_s)
                engine.wait_all()
                if kind == "over":
                    out["over, replaced one gone"].append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--gap", type=float, default=1.0, help="idle seconds before each save")
    p.add_argument("--dir", default=None, help="directory on the disk to measure")
    args = p.parse_args()
    state = fb.model_like_state(int(args.size_gib * fb.GiB))
    tmp = tempfile.mkdtemp(prefix=".fastckpt-bench-", dir=args.dir or os.getcwd())
    try:
        r = measure(state, tmp, args.reps, args.gap)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = statistics.median(r["fresh"])
    print(f"{fb.state_bytes(state) / fb.GiB:.2f} GiB, median of {args.reps} interleaved "
          f"rounds, {args.gap:g} s apart\n")
    print("| save | durable s | / fresh path |")
    print("|---|---:|---:|")
    for name, times in r.items():
        med = statistics.median(times)
        print(f"| {name} | {med:.3f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
