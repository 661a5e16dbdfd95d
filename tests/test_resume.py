"""End to end: a training process killed with SIGKILL after a checkpoint has committed
resumes, in a new process, to parameters bit-identical to an uninterrupted run; and a
run restarted twice mid-epoch still continues where it first stopped."""

import os
import signal
import subprocess
import sys
import threading

import pytest
import resume_train
import torch
from conftest import assert_same
from safetensors.torch import load_file
from test_training import StatefulSampler
from torch.utils.data import DataLoader, TensorDataset

import fastckpt
from fastckpt.training import RANK_KEYS

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


def epoch_run(stateful):
    """A TrainingState over 10 batches an epoch, shuffled by a stateful sampler or by
    a seeded DataLoader (replayed on resume)."""
    data = TensorDataset(torch.arange(40.0).view(40, 1))
    if stateful:
        loader = DataLoader(data, batch_size=4, sampler=StatefulSampler(40, 7))
    else:
        loader = DataLoader(data, batch_size=4, shuffle=True,
                            generator=torch.Generator().manual_seed(7))
    return fastckpt.TrainingState(loader=loader)


def batches(ts, n=None):
    """The next ``n`` batches of the epoch (default: all left), each with the batch
    count and a draw from the global RNG taken alongside."""
    out = []
    for (x,) in ts.iterate():
        out.append((x.flatten().tolist(), ts.batch_index, torch.rand(1).item()))
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("stateful", [False, True])
def test_checkpoint_taken_before_the_first_resumed_batch(tmp_path, stateful):
    torch.manual_seed(0)
    reference = batches(epoch_run(stateful))
    torch.manual_seed(0)
    first = epoch_run(stateful)
    assert batches(first, 3) == reference[:3]
    fastckpt.save(first.state_dict(), tmp_path / "a").wait(timeout=TIMEOUT)

    # Restarted, then checkpointed again before any batch (preempted at once).
    restarted = epoch_run(stateful)
    restarted.load_state_dict(fastckpt.load(tmp_path / "a"))
    torch.rand(5)  # draws before iterate() (building a model...) do not move the point
    fastckpt.save(restarted.state_dict(), tmp_path / "b").wait(timeout=TIMEOUT)
    a, b = fastckpt.load(tmp_path / "a"), fastckpt.load(tmp_path / "b")
    assert_same({k: b[k] for k in RANK_KEYS}, {k: a[k] for k in RANK_KEYS})

    resumed = epoch_run(stateful)
    resumed.load_state_dict(b)
    assert batches(resumed) == reference[3:]
    assert (resumed.epoch, resumed.batch_index) == (1, 0)
