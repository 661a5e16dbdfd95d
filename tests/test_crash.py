"""Crash consistency: a saver killed with SIGKILL at random moments never costs the
last good checkpoint, and what loads is always one whole save, never a mix.

SIGKILL stops the process but not the kernel: written pages still reach the disk.
This covers process crashes (OOM kill, preemption, a segfault in the training
loop), not power loss, where the fsync ordering is what protects the data.

Two savers are killed: one that replaces a single path, and a CheckpointManager that
saves a new step each time and removes old ones behind it.
"""

import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import assert_same
from crash_child import KEEP_LAST, state, step_state

import fastckpt
from fastckpt import catalog, commit

CHILD = os.path.join(os.path.dirname(__file__), "crash_child.py")
KILLS = {"quick": 7, "long": 200}  # per replace mode
MANAGER_KILLS = {"quick": 8, "long": 300}
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


def kill_a_saver(server, request, delay):
    pid = server.ask(request)
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
            kill_a_saver(server, f"save {path} {mode} {1 + i % 2}", rng.uniform(0, MAX_DELAY_S))
            figures["crash.kills_mid_save"] += bool(leftovers(path))
            committed = check_survivor(path, committed)
            # The next save over whatever the crash left succeeds, and cleans up.
            k = rng.choice((1, 2))
            engine.save(state(k), path).wait(timeout=60)
            assert_same(fastckpt.load(path, verify=True), state(k))
            engine.wait_all(timeout=60)  # the replaced checkpoint goes after the commit
            assert not leftovers(path)
            committed = True
            figures[f"crash.kills_survived.{mode}"] += 1


# What a manager's root may hold besides its step directories and its index: hidden
# temporary siblings of either, left by a save, a removal or an index write that was
# killed. No "-old-" sibling: every save is of a new step, so nothing is replaced.
HIDDEN = re.compile(
    rf"^\.(?:step_(\d{{8}})|{re.escape(catalog.INDEX_NAME)}){re.escape(commit.TMP_TAG)}\d+\.[0-9a-f]{{8}}-"
)


def manager_leftovers(root):
    """The hidden entries in ``root``, as (name, step or None for the index)."""
    found = []
    for e in os.listdir(root):
        if e == catalog.INDEX_NAME or re.fullmatch(r"step_\d{8}", e):
            continue
        m = HIDDEN.match(e)
        assert m, f"unexpected entry {e!r} in {root}"
        found.append((e, m.group(1) and int(m.group(1))))
    return found


def check_step(info):
    """A listed checkpoint loads, verified, as the state of the step it is filed
    under, and its manifest records that same step."""
    assert_same(fastckpt.load(info.path, verify=True), step_state(info.step))
    assert fastckpt.verify(info.path).ok
    with fastckpt.open(info.path) as r:
        assert r.metadata["step"] == info.step


def test_sigkill_through_the_manager(server, tmp_path, profile, figures):
    """A manager's saver killed mid-save, mid-removal or in between: a fresh manager
    finds only whole checkpoints, the right state under each step, and saves on."""
    root = str(tmp_path / "run")
    os.mkdir(root)
    rng = random.Random(f"manager/{profile}")
    saved = None  # the last step this process saved
    with fastckpt.Checkpointer(workers=2) as engine:
        for _ in range(MANAGER_KILLS[profile]):
            kill_a_saver(server, f"manage {root}", rng.uniform(0, MAX_DELAY_S))
            hidden = manager_leftovers(root)
            with fastckpt.CheckpointManager(
                root, keep_last=KEEP_LAST, checkpointer=engine
            ) as manager:
                # Opening the root removed what the dead saver left.
                assert not manager_leftovers(root)
                latest = manager.latest()
                listed = manager.list()
                if latest is None:
                    assert saved is None, "a committed checkpoint was lost"
                    assert not listed
                else:
                    assert saved is None or latest.step >= saved, "the latest step went back"
                    assert latest.step == max(i.step for i in listed)
                    for info in listed:
                        check_step(info)
                # Which part of the manager's work the kill cut short: a save is always
                # of the step after the latest, a removal of one before it.
                top = latest.step if latest else 0
                steps = [s for _, s in hidden if s is not None]
                figures["crash.manager.kills_mid_save"] += any(s > top for s in steps)
                figures["crash.manager.kills_mid_removal"] += any(s < top for s in steps)
                figures["crash.manager.kills_before_removal"] += len(listed) > KEEP_LAST
                figures["crash.manager.kills_mid_index_write"] += any(s is None for _, s in hidden)
                # The next step saves beside whatever the crash left, and retention
                # brings the root back to the last KEEP_LAST steps.
                saved = latest.step + 1 if latest else 1
                manager.save(saved, step_state(saved)).wait(timeout=60)
                manager.wait(timeout=60)
                kept = [i.step for i in manager.list()]
                assert kept == list(range(max(1, saved - KEEP_LAST + 1), saved + 1))
                check_step(manager.latest())
            assert not manager_leftovers(root)
            figures["crash.kills_survived.manager"] += 1
