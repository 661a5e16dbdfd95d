"""``make bench``: the checkpoint benchmark on the embedded default state (~1 GiB).

Usage: python -m benchmarks.run [--size-gib 1.0] [--dir PATH] [--reps 3]
Prints markdown tables and writes benchmarks/results/latest.json and latest.png
(the same suite as ``fastckpt bench``; see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import os
import sys

from fastckpt import benchmark as fb

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-gib", type=float, default=1.0, help="state size (default 1 GiB)")
    p.add_argument("--dir", default=None, help="directory on the disk to measure (default: cwd)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per measurement")
    p.add_argument("--train-steps", type=int, default=24,
                   help="steps of the simulated training loop (0: skip it)")
    p.add_argument("--json", default=os.path.join(RESULTS, "latest.json"))
    p.add_argument("--plot", default=os.path.join(RESULTS, "latest.png"))
    args = p.parse_args()
    fb.require_matplotlib()
    state = fb.model_like_state(int(args.size_gib * fb.GiB))
    r = fb.run_suite(state, workdir=args.dir, reps=args.reps, train_steps=args.train_steps,
                     log=lambda m: print(m, file=sys.stderr, flush=True))
    r["environment"] = fb.environment()
    print()
    print(fb.format_report(r))
    fb.write_json(r, args.json)
    fb.plot(r, args.plot)
    print(f"\nJSON: {args.json}\nplot: {args.plot}")


if __name__ == "__main__":
    main()
