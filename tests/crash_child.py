"""Fork server for tests/test_crash.py: savers to be killed with SIGKILL.

Importing torch takes seconds, so this process imports it once and forks a fresh
saver per request. Requests on stdin, one reply line each on stdout:

    save PATH MODE FIRST  ->  pid of a child saving state FIRST, then the other
                              state, alternately, to PATH until it is killed
    reap PID              ->  the child's wait status

MODE "exchange" replaces the checkpoint with renameat2(RENAME_EXCHANGE); MODE
"fallback" takes the two-rename path used where the filesystem lacks it. Reaping is
the parent's job because the engine tells a dead saver's leftovers by its pid no
longer existing, and an unreaped child still exists.
"""

import os
import sys
import traceback

import torch

import fastckpt
from fastckpt import commit

WIDTH = 32 * 1024  # float32 elements per tensor: ~1.1 MiB per state, ~5 shards
SHARD_SIZE = 256 << 10


def state(k):
    """State 1 or 2: every tensor filled with ``k`` and the step ``k``, so that any
    mix of two saves, or a partial one, differs from both."""
    return {
        "step": k,
        "model": {f"layer{i}.weight": torch.full((WIDTH,), float(k)) for i in range(8)},
        "optim": [{"exp_avg": torch.full((WIDTH,), -float(k)), "lr": 0.1 * k}],
    }


def save_forever(path, mode, k):
    if mode == "fallback":
        commit._exchange = lambda a, b: False
    with fastckpt.Checkpointer(workers=2, shard_size=SHARD_SIZE) as engine:
        while True:
            engine.save(state(k), path).wait(timeout=60)
            k = 3 - k


def child(path, mode, first):
    try:
        save_forever(path, mode, int(first))
    except BaseException:  # noqa: BLE001 - any exit but SIGKILL fails the test
        traceback.print_exc()
    finally:
        os._exit(3)


def serve():
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "save":
            pid = os.fork()
            if pid == 0:
                child(*args)
            reply = pid
        else:
            reply = os.waitpid(int(args[0]), 0)[1]
        print(reply, flush=True)


if __name__ == "__main__":
    serve()
