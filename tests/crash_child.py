"""Fork server for tests/test_crash.py: savers to be killed with SIGKILL.

Importing torch takes seconds, so this process imports it once and forks a fresh
saver per request. Requests on stdin, one reply line each on stdout:

    save PATH MODE FIRST  ->  pid of a child saving state FIRST, then the other
                              state, alternately, to PATH until it is killed
    manage ROOT           ->  pid of a child saving step after step through a
                              CheckpointManager in ROOT (see step_state) that keeps
                              the last KEEP_LAST, until it is killed
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
KEEP_LAST = 2


def state(k):
    """State 1 or 2: every tensor filled with ``k`` and the step ``k``, so that any
    mix of two saves, or a partial one, differs from both."""
    return {
        "step": k,
        "model": {f"layer{i}.weight": torch.full((WIDTH,), float(k)) for i in range(8)},
        "optim": [{"exp_avg": torch.full((WIDTH,), -float(k)), "lr": 0.1 * k}],
    }


def step_state(step):
    """What the checkpoint of a manager's ``step`` holds: state 1 at odd steps, state 2
    at even ones, so that the step it is filed under says which state must load."""
    return state(2 - step % 2)


def save_forever(path, mode, first):
    if mode == "fallback":
        commit._exchange = lambda a, b: False
    k = int(first)
    with fastckpt.Checkpointer(workers=2, shard_size=SHARD_SIZE) as engine:
        while True:
            engine.save(state(k), path).wait(timeout=60)
            k = 3 - k


def manage_forever(root):
    # Each commit makes the manager's housekeeping thread remove the step that fell
    # out of the last KEEP_LAST while the next save is already staging, so a kill
    # can land in a save, in a removal, or in both at once.
    with (
        fastckpt.Checkpointer(workers=2, shard_size=SHARD_SIZE) as engine,
        fastckpt.CheckpointManager(root, keep_last=KEEP_LAST, checkpointer=engine) as manager,
    ):
        latest = manager.latest()
        step = latest.step + 1 if latest else 1
        while True:
            manager.save(step, step_state(step)).wait(timeout=60)
            step += 1


WORKS = {"save": save_forever, "manage": manage_forever}


def child(work, *args):
    try:
        work(*args)
    except BaseException:  # noqa: BLE001 - any exit but SIGKILL fails the test
        traceback.print_exc()
    finally:
        os._exit(3)


def serve():
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd in WORKS:
            pid = os.fork()
            if pid == 0:
                child(WORKS[cmd], *args)
            reply = pid
        else:
            reply = os.waitpid(int(args[0]), 0)[1]
        print(reply, flush=True)


if __name__ == "__main__":
    serve()
