"""Crash consistency: a saver killed with SIGKILL at random moments never costs the
last good checkpoint, and what loads is always one whole save, never a mix.

SIGKILL stops the process but not the kernel: written pages still reach the disk.
This covers process crashes (OOM kill, preemption, a segfault in the training
loop), not power loss, where the fsync ordering is what protects the data.

Not covered yet: the checkpoint manager (several retained steps); its crash test
belongs here once it exists.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import assert_same
from crash_child import state

import fastckpt
from fastckpt import commit

CHILD = os.path.join(os.path.dirname(__file__), "crash_child.py")
KILLS = {"quick": 7, "long": 200}  # per replace mode
# A save of the child's state takes ~10-150 ms here: killing within 300 ms of the
# start lands anywhere from the first save's staging to a few saves in.
MAX_DELAY_S = 0.3


class Server:
    """The fork server of crash_child.py, started once: forking a process that has
    already imported torch takes milliseconds, importing it again takes seconds."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def ask(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply, "crash_child.py died"
        return int(reply)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


def kill_a_saver(server, path, mode, first, delay):
    pid = server.ask(f"save {path} {mode} {first}")
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    status = server.ask(f"reap {pid}")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"the saver exited by itself (status {status}): see its traceback above"
    )


def leftovers(path):
    parent, name = os.path.split(path)
    found = [e for e in os.listdir(parent) if e != name]
    tags = (f".{name}{commit.TMP_TAG}", f".{name}{commit.OLD_TAG}")
    assert all(e.startswith(tags) for e in found), found
    return found


def check_survivor(path, committed):
    """After a kill: the path loads, verified, as exactly state 1 or state 2 (or, if
    nothing was ever committed, holds no checkpoint). Returns whether it loaded."""
    try:
        out = fastckpt.load(path, verify=True)
    except fastckpt.CheckpointNotFoundError:
        assert not committed, "a committed checkpoint was lost"
        return False
    assert out["step"] in (1, 2)
    assert_same(out, state(out["step"]))
    assert fastckpt.verify(path).ok
    return True


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_sigkill_never_loses_the_last_checkpoint(server, tmp_path, profile, mode, figures):
    path = str(tmp_path / "ckpt")
    rng = random.Random(f"{mode}/{profile}")
    committed = False
    with fastckpt.Checkpointer(workers=2) as engine:
        for i in range(KILLS[profile]):
            kill_a_saver(server, path, mode, 1 + i % 2, rng.uniform(0, MAX_DELAY_S))
            figures["crash.kills_mid_save"] += bool(leftovers(path))
            committed = check_survivor(path, committed)
            # The next save over whatever the crash left succeeds, and cleans up.
            k = rng.choice((1, 2))
            engine.save(state(k), path).wait(timeout=60)
            assert_same(fastckpt.load(path, verify=True), state(k))
            assert not leftovers(path)
            committed = True
            figures[f"crash.kills_survived.{mode}"] += 1
