"""``make bench``: the save benchmark on the embedded default state (~1 GiB).

Usage: python -m benchmarks.run [--size-gib 1.0] [--dir PATH] [--reps 3]
Prints markdown tables and writes benchmarks/results/save-latest.json.
"""

from __future__ import annotations

import argparse
import os

from fastckpt import benchmark as fb

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-gib", type=float, default=1.0, help="state size (default 1 GiB)")
    p.add_argument("--dir", default=None, help="directory on the disk to measure (default: cwd)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per measurement")
    p.add_argument("--json", default=os.path.join(HERE, "results", "save-latest.json"))
    args = p.parse_args()
    state = fb.model_like_state(int(args.size_gib * fb.GiB))
    r = fb.run_save_suite(state, workdir=args.dir, reps=args.reps)
    r["environment"] = fb.environment()
    print()
    print(fb.format_report(r))
    fb.write_json(r, args.json)
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
