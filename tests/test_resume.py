"""End to end: a training process killed with SIGKILL after a checkpoint has committed
resumes, in a new process, to parameters bit-identical to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import threading

import pytest
import resume_train
import torch
from safetensors.torch import load_file

import fastckpt

SCRIPT = os.path.join(os.path.dirname(__file__), "resume_train.py")
TOTAL, EVERY = 30, 5  # 7 batches per epoch: every checkpoint falls mid-epoch
TIMEOUT = 60


@pytest.fixture
def train():
    """Start a training process; any still running at the end of the test is killed."""
    procs = []

    def start(root, out, delay=0.0, wait=False):
        args = [str(root), str(out), str(TOTAL), str(EVERY), str(delay)] + ["--wait"] * wait
        procs.append(subprocess.Popen(
            [sys.executable, SCRIPT, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        ))
        return procs[-1]

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=TIMEOUT)


def kill_after_first_commit(proc):
    """A thread that SIGKILLs ``proc`` the moment it reports a committed checkpoint."""
    seen = []

    def watch():
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("committed "):
                os.kill(proc.pid, signal.SIGKILL)
                return

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t, seen


def uninterrupted(root, out):
    """The reference run, in this process (it overlaps the run to be killed)."""
    threads = torch.get_num_threads()
    try:
        resume_train.main(str(root), str(out), TOTAL, EVERY, 0.0)
    finally:
        torch.set_num_threads(threads)


def test_sigkill_then_resume_is_bit_identical(tmp_path, train):
    killed = train(tmp_path / "run", tmp_path / "unused.safetensors", delay=0.05)
    # Started now so that its imports overlap; it opens the root only when told to.
    resumed = train(tmp_path / "run", tmp_path / "resumed.safetensors", wait=True)
    watcher, seen = kill_after_first_commit(killed)
    uninterrupted(tmp_path / "ref", tmp_path / "ref.safetensors")
    watcher.join(timeout=TIMEOUT)
    killed.wait(timeout=TIMEOUT)
    assert killed.returncode == -signal.SIGKILL, "".join(seen)

    with fastckpt.CheckpointManager(tmp_path / "run") as manager:
        latest = manager.latest()
    assert latest is not None and latest.step < TOTAL
    log, _ = resumed.communicate(input="go\n", timeout=TIMEOUT)
    assert resumed.returncode == 0, log
    assert f"resumed {latest.step}" in log

    expected = load_file(tmp_path / "ref.safetensors")
    got = load_file(tmp_path / "resumed.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    # Nothing the killed run left half-written survives a manager starting on the root.
    assert not [e for e in os.listdir(tmp_path / "run") if e.startswith(".step_")]
