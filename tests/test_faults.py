"""Fault injection: every OS step of a save fails in turn, with ENOSPC, EIO and EACCES.

Each time the user gets a ``CheckpointWriteError`` naming the file, with the
``OSError`` as ``__cause__``, at ``wait()`` or else at the next ``save()``; the
previous checkpoint still loads, verified; no temporary directory is left; the
engine saves again. Then the same against a real full and a real read-only
filesystem (a 1 MiB tmpfs, mounted as root).
"""

import contextlib
import errno
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import assert_same, skip_without_direct_io
from faults import EACCES, EIO, ENOSPC, FailingLibc, FaultyOS, NthMatch

import fastckpt
from fastckpt import checkpointer, commit, writer
from fastckpt.errors import CheckpointWriteError
from fastckpt.manifest import MANIFEST_NAME

ERRNOS = [ENOSPC, EIO, EACCES]
WIDTH = 32 * 1024  # 128 KiB tensors: one shard each, two staging blocks each


def state(k, width=WIDTH):
    return {"step": k, **{f"w{i}": torch.full((width,), float(k)) for i in range(3)}}


A, B = state(1), state(2)


def is_shard(p):
    return p.endswith(".safetensors")


def is_manifest(p):
    return os.path.basename(p) == MANIFEST_NAME


def anything(_p):
    return True


@dataclass(frozen=True)
class Point:
    """One OS step of a save: ``call`` made through ``module`` on paths that ``match``."""

    module: Any
    call: str
    match: Any = anything
    names_hit: bool = False  # the error names the failing file itself, not the checkpoint
    previous: bool = True  # a checkpoint exists at the path before the failing save
    fallback: bool = False  # replace with two renames, as where renameat2 is missing
    attr: str = "os"  # the module attribute of ``module`` that makes the call
    engine: tuple = ()  # Checkpointer options besides FAULT_ENGINE's


POINTS = {
    "mkdir": Point(checkpointer, "mkdir", names_hit=True),
    "open shard": Point(writer, "open", is_shard, names_hit=True),
    "write shard": Point(writer, "write", is_shard, names_hit=True),
    # A shard of 256 KiB or more, of a state that fits in the staging budget, goes to
    # the disk through O_DIRECT.
    "write shard (direct)": Point(writer, "pwrite_direct", is_shard, names_hit=True,
                                  attr="fileio", engine=(("staging_budget", 8 << 20),
                                                         ("shard_size", 1 << 20))),
    "fsync shard": Point(writer, "fsync", is_shard, names_hit=True),
    "open manifest": Point(commit, "open", is_manifest),
    # The manifest is written by writer.write_all, through writer's os.
    "write manifest": Point(writer, "write", is_manifest),
    "fsync manifest": Point(commit, "fsync", is_manifest),
    # fsync_dir: first the temporary directory, then (after the rename) the parent.
    "open dir": Point(commit, "open", os.path.isdir),
    "fsync dir": Point(commit, "fsync", os.path.isdir),
    "rename": Point(commit, "rename", previous=False),
    "renameat2 exchange": Point(commit, "renameat2"),
    "rename (fallback)": Point(commit, "rename", fallback=True),
}
# The fallback replace renames twice; the second failing must put the old one back.
QUICK_CASES = [(name, 1) for name in POINTS] + [("rename (fallback)", 2)]


@contextlib.contextmanager
def armed(point, err, when):
    """Swap the stand-in for ``os`` (or libc) into ``point.module`` for the block."""
    if point.call == "renameat2":
        attr, stand_in = "_libc", FailingLibc(commit._libc, err, when)
    else:
        attr = point.attr
        stand_in = FaultyOS(getattr(point.module, attr), **{point.call: (err, when)})
    real = getattr(point.module, attr)
    setattr(point.module, attr, stand_in)
    try:
        yield
    finally:
        setattr(point.module, attr, real)


def finish(handle):
    deadline = time.monotonic() + 30
    while not handle.done():
        assert time.monotonic() < deadline, "a failed save never finished"
        time.sleep(0.005)


def fail_save(engine, path, point, err, nth, observe):
    """Save B over A with the ``nth`` matching call failing. Returns the error as the
    user meets it (from ``wait()``, or from the next ``save()`` when nobody waited) and
    the path the call failed on; (None, None) if fewer calls matched."""
    when = NthMatch(point.match, nth)
    with armed(point, err, when):
        try:
            handle = engine.save(B, path)
        except CheckpointWriteError as e:  # failed on the caller's thread (mkdir)
            return e, when.hit
        finish(handle)
    if when.hit is None:
        handle.wait(timeout=30)
        return None, None
    with pytest.raises(CheckpointWriteError) as info:
        if observe == "wait":
            handle.wait(timeout=30)
        else:
            engine.save(B, path)
    return info.value, when.hit


def check_fault(engine, path, name, err, nth, observe, figures):
    """Inject one fault at step ``name`` and check all the user and the disk show. False
    when the save makes fewer than ``nth`` matching calls (nothing was injected)."""
    point = POINTS[name]
    if point.previous:
        engine.save(A, path).wait(timeout=30)
    error, hit = fail_save(engine, path, point, err, nth, observe)
    if error is None:
        assert_same(fastckpt.load(path, verify=True), B)
        return False
    assert isinstance(error.__cause__, OSError) and error.__cause__.errno == err, error
    assert (hit if point.names_hit else path) in str(error), error
    parent = os.path.dirname(path)
    if not point.previous:
        assert not os.path.exists(path)
    else:
        # Only the parent's fsync comes after the rename: then B is in place, not yet
        # known durable. A failure anywhere before it leaves A.
        assert_same(fastckpt.load(path, verify=True), B if hit == parent else A)
    assert sorted(os.listdir(parent)) == (["ckpt"] if point.previous else [])
    engine.save(B, path).wait(timeout=30)  # the engine keeps working
    assert_same(fastckpt.load(path, verify=True), B)
    figures["faults.injected"] += 1
    figures[f"faults.by_step.{name}"] += 1
    figures[f"faults.by_errno.{errno.errorcode[err]}"] += 1
    return True


# Small blocks and shards: several shards, each written in several pieces.
FAULT_ENGINE = {"workers": 2, "shard_size": WIDTH * 4, "staging_budget": 64 << 10}


def run_point(tmp_path, monkeypatch, name, err, nth, figures):
    point = POINTS[name]
    if point.call == "pwrite_direct":
        skip_without_direct_io(tmp_path)
    if point.fallback:
        monkeypatch.setattr(commit, "_exchange", lambda a, b: False)
    fired = []
    with fastckpt.Checkpointer(**{**FAULT_ENGINE, **dict(point.engine)}) as engine:
        for observe in ("wait", "next save"):
            path = str(tmp_path / observe.replace(" ", "_") / "ckpt")
            os.makedirs(os.path.dirname(path))
            fired.append(check_fault(engine, path, name, err, nth, observe, figures))
    return all(fired)


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("name, nth", QUICK_CASES)
def test_fault_at_each_step(tmp_path, monkeypatch, name, nth, err, figures):
    assert run_point(tmp_path, monkeypatch, name, err, nth, figures)


@pytest.mark.slow
@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("name", [n for n in POINTS if not POINTS[n].fallback])
def test_fault_at_every_later_call(tmp_path, monkeypatch, name, err, figures):
    nth = 2
    while run_point(tmp_path / str(nth), monkeypatch, name, err, nth, figures):
        nth += 1


# -- real filesystems ----------------------------------------------------------------


def mount_tmpfs(where, size):
    os.makedirs(where)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where],
                       check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {e}")


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs: small enough to fill, on a filesystem that really runs out."""
    where = str(tmp_path / "fs")
    mount_tmpfs(where, "1m")
    yield where
    subprocess.run(["umount", "-l", where], check=True, timeout=30)


FREE_SPACE = {"quick": [0, 64 << 10, 200 << 10], "long": list(range(0, 420 << 10, 4 << 10))}


def fill(fs, free):
    """Fill ``fs`` up to ``free`` bytes left (tmpfs counts whole pages)."""
    filler = os.path.join(fs, "filler")
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, _free(fs) - free))
    return filler


def _free(fs):
    st = os.statvfs(fs)
    return st.f_bavail * st.f_frsize


def test_full_filesystem(small_fs, profile, figures):
    path = os.path.join(small_fs, "ckpt")
    small, big = state(1, width=1024), state(2)  # 12 KiB, then ~400 KiB
    enospc = 0
    with fastckpt.Checkpointer(workers=2, shard_size=WIDTH * 4, staging_budget=64 << 10) as c:
        for free in FREE_SPACE[profile]:
            c.save(small, path).wait(timeout=30)
            c.wait_all(timeout=30)  # the space of the checkpoint it replaced is free
            filler = fill(small_fs, free)
            try:
                c.save(big, path).wait(timeout=30)
            except CheckpointWriteError as e:
                assert e.__cause__.errno == ENOSPC, e
                assert_same(fastckpt.load(path, verify=True), small)
                enospc += 1
                where = "shard" if "safetensors" in str(e) else "commit"
                figures[f"faults.real_enospc.{where}"] += 1
            else:
                assert_same(fastckpt.load(path, verify=True), big)
            c.wait_all(timeout=30)  # the replaced checkpoint goes after the commit
            assert sorted(os.listdir(small_fs)) == ["ckpt", "filler"]
            os.remove(filler)
    assert enospc > 0


def test_read_only_filesystem(small_fs):
    path = os.path.join(small_fs, "ckpt")
    with fastckpt.Checkpointer(workers=2) as c:
        c.save(A, path).wait(timeout=30)
        subprocess.run(["mount", "-o", "remount,ro", small_fs], check=True, timeout=30)
        with pytest.raises(CheckpointWriteError) as info:
            c.save(B, path).wait(timeout=30)
        assert info.value.__cause__.errno == errno.EROFS
        assert_same(fastckpt.load(path, verify=True), A)
        subprocess.run(["mount", "-o", "remount,rw", small_fs], check=True, timeout=30)
        c.save(B, path).wait(timeout=30)
    assert_same(fastckpt.load(path, verify=True), B)


def test_read_only_directory(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions: test_read_only_filesystem covers this")
    box = tmp_path / "box"
    box.mkdir()
    path = str(box / "ckpt")
    with fastckpt.Checkpointer(workers=2) as c:
        c.save(A, path).wait(timeout=30)
        box.chmod(0o555)
        try:
            with pytest.raises(CheckpointWriteError) as info:
                c.save(B, path).wait(timeout=30)
        finally:
            box.chmod(0o755)
        assert info.value.__cause__.errno == EACCES
        assert_same(fastckpt.load(path, verify=True), A)
