"""Engine semantics: snapshot, back-pressure, bounded staging, errors, atomic commit."""

import asyncio
import ctypes
import errno
import mmap
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections import OrderedDict

import pytest
import torch
from conftest import (
    assert_same,
    data_start,
    huge_page_eligible,
    shards,
    skip_without_direct_io,
)
from faults import ENOSPC, FaultyOS, NthMatch, always
from safetensors.torch import load_file

import fastckpt
from fastckpt import checkpointer, commit, fileio, writer
from fastckpt.staging import Stager, StagingPool
from fastckpt.tree import MAX_DEPTH


def state(n=8, size=64 * 1024):
    return {f"w{i}": torch.randn(size) for i in range(n)}


def test_mutation_after_save_does_not_leak(ckpt, engine):
    obj = state()
    before = {k: v.clone() for k, v in obj.items()}
    handle = engine.save(obj, ckpt)
    for v in obj.values():
        v.fill_(0)  # before the write has finished
    handle.wait(timeout=60)
    out = fastckpt.load(ckpt)
    for k in obj:
        assert torch.equal(out[k], before[k])


def test_state_larger_than_staging_budget(ckpt):
    obj = {f"w{i}": torch.randn(1 << 20) for i in range(10)}  # 40 MiB, budget 4 MiB
    budget = 4 << 20
    with fastckpt.Checkpointer(staging_budget=budget, workers=2) as c:
        peak = [0]
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                peak[0] = max(peak[0], c._pool.allocated)

        t = threading.Thread(target=watch)
        t.start()
        try:
            result = c.save(obj, ckpt).wait(timeout=120)
        finally:
            stop.set()
            t.join()
    assert result.nbytes == 40 << 20
    assert 0 < peak[0] <= budget
    out = fastckpt.load(ckpt, verify=True)
    assert all(torch.equal(out[k], obj[k]) for k in obj)


def test_one_tensor_larger_than_budget(ckpt):
    x = torch.randn(3 << 20)  # 12 MiB through a 1 MiB budget
    with fastckpt.Checkpointer(staging_budget=1 << 20) as c:
        c.save({"x": x}, ckpt).wait(timeout=120)
    assert torch.equal(fastckpt.load(ckpt, verify=True)["x"], x)


def test_staging_buffers_are_reused(tmp_path, engine):
    obj = state()
    engine.save(obj, tmp_path / "a").wait(timeout=60)
    held = engine._pool.allocated
    for i in range(5):
        engine.save(obj, tmp_path / f"b{i}").wait(timeout=60)
    assert engine._pool.allocated == held


def test_back_pressure_many_saves(tmp_path):
    obj = state()
    with fastckpt.Checkpointer(max_inflight=2, staging_budget=16 << 20) as c:
        handles = [c.save(obj, tmp_path / f"c{i}") for i in range(8)]
        assert c._pool.allocated <= 16 << 20
        results = [h.wait(timeout=120) for h in handles]
    assert all(r.nbytes == 8 * 64 * 1024 * 4 for r in results)
    for i in range(8):
        assert fastckpt.verify(tmp_path / f"c{i}").ok


def test_unsupported_value_names_the_key_path(ckpt, engine):
    with pytest.raises(TypeError, match=r"opt/param_groups/0/fn"):
        engine.save({"opt": {"param_groups": [{"fn": lambda: 1}]}}, ckpt)
    with pytest.raises(fastckpt.UnsupportedTypeError, match="object"):
        engine.save({"x": object()}, ckpt)
    assert not os.path.exists(ckpt)
    assert not [e for e in os.listdir(os.path.dirname(ckpt)) if "fastckpt" in e]


def nest(depth, leaf):
    """``leaf`` inside ``depth`` containers, cycling through every kind of container."""
    kinds = [lambda x: {"k": x}, lambda x: (x,), lambda x: [x], lambda x: OrderedDict(k=x)]
    for i in range(depth):
        leaf = kinds[i % 4](leaf)
    return leaf


def test_nesting_limit(ckpt, engine):
    """The deepest state save() takes loads back, even from a deep call stack; one level
    more is refused up front, naming where, and nothing is written."""
    deepest = nest(MAX_DEPTH, torch.arange(3))
    with pytest.raises(fastckpt.UnsupportedTypeError, match=f"more than {MAX_DEPTH} deep"):
        engine.save([deepest], ckpt)
    assert not os.path.exists(ckpt)
    engine.save(deepest, ckpt).wait(timeout=60)

    def load_from_depth(frames):
        return load_from_depth(frames - 1) if frames else fastckpt.load(ckpt, verify=True)

    assert_same(load_from_depth(300), deepest)


def test_result_fields(ckpt, engine):
    r = engine.save(state(), ckpt).wait(timeout=60)
    assert r.path == os.path.abspath(ckpt)
    assert r.nbytes == 8 * 64 * 1024 * 4
    assert 0 < r.stall_s <= r.total_s
    assert r.num_tensors == 8 and r.num_shards >= 1


def _fail_writes(monkeypatch):
    faulty = FaultyOS(write=(ENOSPC, always))
    monkeypatch.setattr(writer, "os", faulty)
    return faulty


def test_background_failure_surfaces_at_wait(ckpt, engine, monkeypatch):
    engine.save({"x": torch.ones(4)}, ckpt).wait(timeout=60)
    faulty = _fail_writes(monkeypatch)
    handle = engine.save({"x": torch.zeros(4)}, ckpt)
    with pytest.raises(fastckpt.CheckpointWriteError, match="shard-00001") as info:
        handle.wait(timeout=60)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == ENOSPC and faulty.calls["write"] > 0
    assert torch.equal(fastckpt.load(ckpt, verify=True)["x"], torch.ones(4))  # old one intact
    assert [e for e in os.listdir(os.path.dirname(ckpt))] == ["ckpt"]  # temp dir removed
    monkeypatch.undo()
    engine.save({"x": torch.zeros(4)}, ckpt).wait(timeout=60)  # the engine keeps working
    assert torch.equal(fastckpt.load(ckpt)["x"], torch.zeros(4))


def test_background_failure_surfaces_at_next_save(ckpt, engine, monkeypatch):
    _fail_writes(monkeypatch)
    handle = engine.save({"x": torch.zeros(4)}, ckpt)
    while not handle.done():
        handle._future.exception(timeout=60)
    monkeypatch.undo()
    with pytest.raises(fastckpt.CheckpointWriteError):
        engine.save({"x": torch.ones(4)}, ckpt)
    engine.save({"x": torch.ones(4)}, ckpt).wait(timeout=60)  # reported once, then cleared
    assert torch.equal(fastckpt.load(ckpt)["x"], torch.ones(4))


def test_atomic_replace_keeps_old_until_commit(ckpt, engine):
    engine.save({"v": torch.tensor(1)}, ckpt).wait(timeout=60)
    engine.save({"v": torch.tensor(2), "extra": torch.ones(3)}, ckpt).wait(timeout=60)
    out = fastckpt.load(ckpt, verify=True)
    assert out["v"].item() == 2 and "extra" in out
    engine.wait_all(timeout=60)  # the replaced checkpoint is removed after the commit
    assert sorted(os.listdir(os.path.dirname(ckpt))) == ["ckpt"]


def test_exchange_fallback_path(ckpt, engine, monkeypatch):
    monkeypatch.setattr(commit, "_exchange", lambda a, b: False)
    engine.save({"v": torch.tensor(1)}, ckpt).wait(timeout=60)
    engine.save({"v": torch.tensor(2)}, ckpt).wait(timeout=60)
    assert fastckpt.load(ckpt)["v"].item() == 2
    engine.wait_all(timeout=60)
    assert sorted(os.listdir(os.path.dirname(ckpt))) == ["ckpt"]


def test_crash_between_fallback_renames_is_recovered(ckpt, engine):
    engine.save({"v": torch.tensor(1)}, ckpt).wait(timeout=60)
    dead = _dead_pid()
    old = os.path.join(os.path.dirname(ckpt), f".ckpt{commit.OLD_TAG}{dead}-abc")
    os.rename(ckpt, old)  # as if killed after the first rename
    assert fastckpt.load(ckpt)["v"].item() == 1  # readers find the old one
    engine.save({"v": torch.tensor(2)}, ckpt).wait(timeout=60)
    assert fastckpt.load(ckpt)["v"].item() == 2
    engine.wait_all(timeout=60)
    assert sorted(os.listdir(os.path.dirname(ckpt))) == ["ckpt"]


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("owner", ["{pid}.{host}", "{pid}"], ids=["this-host", "pid-only"])
def test_leftovers_of_dead_saves_are_cleaned(ckpt, engine, owner):
    dead = owner.format(pid=_dead_pid(), host=commit.owner().split(".")[1])
    leftover = os.path.join(os.path.dirname(ckpt), f".ckpt{commit.TMP_TAG}{dead}-deadbeef")
    os.makedirs(leftover)
    open(os.path.join(leftover, "shard-00001-of-00001.safetensors"), "wb").close()
    engine.save({"x": torch.ones(2)}, ckpt).wait(timeout=60)
    assert not os.path.exists(leftover)


def test_another_hosts_saves_are_left_alone(ckpt, engine):
    """On a shared filesystem, a pid not running here may be a live save elsewhere:
    its temporary directory, or the checkpoint it is replacing, is not ours."""
    parent = os.path.dirname(ckpt)
    host = commit.owner().split(".")[1]
    elsewhere = f"{_dead_pid()}.{'0' * 8 if host != '0' * 8 else '1' * 8}"
    writing = os.path.join(parent, f".ckpt{commit.TMP_TAG}{elsewhere}-deadbeef")
    os.makedirs(writing)
    open(os.path.join(writing, "shard-00001-of-00001.safetensors"), "wb").close()
    engine.save({"v": torch.tensor(1)}, ckpt).wait(timeout=60)
    replacing = os.path.join(parent, f".ckpt{commit.OLD_TAG}{elsewhere}-abc")
    os.rename(ckpt, replacing)  # that host is between the two renames of a replace
    commit.recover(ckpt)
    assert not os.path.exists(ckpt)
    assert sorted(os.listdir(parent)) == sorted(map(os.path.basename, (writing, replacing)))


def test_refuses_to_replace_foreign_data(tmp_path, engine):
    d = tmp_path / "data"
    d.mkdir()
    (d / "precious.txt").write_text("x")
    with pytest.raises(fastckpt.CheckpointError, match="not a fastckpt checkpoint"):
        engine.save({"x": torch.ones(1)}, d)
    f = tmp_path / "file.pt"
    f.write_bytes(b"x")
    with pytest.raises(fastckpt.CheckpointError, match="not a directory"):
        engine.save({"x": torch.ones(1)}, f)
    assert (d / "precious.txt").read_text() == "x" and f.read_bytes() == b"x"


def test_closed_engine_refuses(ckpt):
    c = fastckpt.Checkpointer()
    h = c.save({"x": torch.ones(1)}, ckpt)
    c.close()
    assert h.done() and h.wait().nbytes == 4
    with pytest.raises(fastckpt.CheckpointError, match="closed"):
        c.save({"x": torch.ones(1)}, ckpt)


def test_module_level_save_completes_at_interpreter_exit(tmp_path):
    path = tmp_path / "exit"
    code = (
        "import torch, fastckpt\n"
        f"fastckpt.save({{'x': torch.arange(4_000_000)}}, {str(path)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert torch.equal(fastckpt.load(path, verify=True)["x"], torch.arange(4_000_000))


def test_await_handle(ckpt, engine):
    import asyncio

    async def main():
        return await engine.save({"x": torch.ones(3)}, ckpt)

    assert asyncio.run(main()).nbytes == 12


# -- O_DIRECT writes ---------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def cached_fraction(path):
    """The fraction of a file's pages held in the page cache (mincore)."""
    pages = -(-os.path.getsize(path) // mmap.PAGESIZE)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mm:
        vec = (ctypes.c_ubyte * pages)()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(len(mm)), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        del addr
        return sum(v & 1 for v in vec) / pages


@pytest.fixture
def direct_dir(tmp_path):
    skip_without_direct_io(tmp_path)
    return tmp_path


@pytest.mark.parametrize("options, direct", [
    ({}, True),
    ({"direct_io": False}, False),
    ({"staging_budget": 1 << 20}, False),  # staged in pieces: buffers return sooner
    ({"compression": "zstd"}, True),  # payloads are gathered into aligned requests
    ({"compression": "auto"}, True),
    ({"compression": "auto", "staging_budget": 1 << 20}, False),
])
def test_large_shards_bypass_the_page_cache(direct_dir, options, direct):
    path = direct_dir / "ckpt"
    saved = state(n=4, size=(1 << 20) + 3)  # 16 MiB and a tail that is no whole block
    with fastckpt.Checkpointer(**options) as c:
        c.save(saved, path).wait(timeout=60)
    (shard,) = shards(path)
    cached = cached_fraction(shard)
    # Direct: only the header's page and the last, partial block went through the cache.
    assert cached < 0.01 if direct else cached > 0.9, cached
    assert data_start(shard) % fileio.DIRECT_ALIGN == 0
    if "compression" not in options:
        assert_same(load_file(shard), saved)  # stock safetensors reads the padded header
    assert_same(fastckpt.load(path, verify=True), saved)


def test_small_shards_keep_a_short_header(ckpt, engine):
    engine.save({"x": torch.ones(1000)}, ckpt).wait(timeout=60)
    assert data_start(shards(ckpt)[0]) < fileio.DIRECT_ALIGN


def test_staging_buffers_are_page_aligned():
    pool = StagingPool(128 << 20, pin=False)
    bufs = [pool.acquire(n) for n in (1, 5000, 3 << 20, 64 << 20)]
    assert all(b.data_ptr() % fileio.DIRECT_ALIGN == 0 for b in bufs)
    assert all(huge_page_eligible(b.data_ptr()) for b in bufs[2:])  # see fileio.io_buffer


class FromSecond:
    """FaultyOS predicate: true from the second call on."""

    def __init__(self):
        self.seen = 0

    def __call__(self, *_args):
        self.seen += 1
        return self.seen > 1


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_direct_write_refused_goes_on_buffered(direct_dir, monkeypatch, caplog, compression):
    """A filesystem that opens O_DIRECT but refuses some writes (EINVAL): the first
    goes through, the rest of the shard goes through the page cache. Small gather
    buffers: the refusal meets gathered writes in flight on the sink's thread."""
    faulty = FaultyOS(fileio, pwrite_direct=(errno.EINVAL, FromSecond()))
    monkeypatch.setattr(writer, "fileio", faulty)
    monkeypatch.setattr(writer, "PACE_STEP", 64 << 10)
    saved = state(n=4, size=(1 << 20) + 3)  # the aligned body, then the tail
    with fastckpt.Checkpointer(compression=compression) as c, \
            caplog.at_level("INFO", logger="fastckpt"):
        c.save(saved, direct_dir / "ckpt").wait(timeout=60)
    assert faulty.calls["pwrite_direct"] == 1 and "O_DIRECT write refused" in caplog.text
    assert_same(fastckpt.load(direct_dir / "ckpt", verify=True), saved)


def compressed_only(n=6, size=512 << 10):
    """Float tensors that all get compressed: a data section made of payloads only,
    every byte of which goes through the gather buffers."""
    return {f"w{i}": torch.randn(size).to(torch.bfloat16) for i in range(n)}


def test_gathered_writes_overlap_the_next_gather(direct_dir, monkeypatch):
    """While the sink's thread writes a full gather buffer, the writer goes on filling
    the next one, instead of waiting for the disk itself."""
    monkeypatch.setattr(writer, "PACE_STEP", 64 << 10)
    blocked, release = threading.Event(), threading.Event()
    gathered = []  # bytes copied into gather buffers before the first write returned
    real_write, real_copy = fileio.pwrite_direct, fileio.copy_into

    def held_write(fd, offset, buf):
        if not blocked.is_set():
            blocked.set()
            release.wait(30)
        real_write(fd, offset, buf)

    def copy(dst, src):
        if not release.is_set():
            gathered.append(len(src))
        real_copy(dst, src)

    monkeypatch.setattr(fileio, "pwrite_direct", held_write)
    monkeypatch.setattr(fileio, "copy_into", copy)
    saved = compressed_only()
    with fastckpt.Checkpointer(compression="zstd", workers=1) as c:
        handle = c.save(saved, direct_dir / "ckpt")
        assert blocked.wait(30)
        deadline = time.monotonic() + 5
        while sum(gathered) <= writer.PACE_STEP and time.monotonic() < deadline:
            time.sleep(0.005)
        overlapped = sum(gathered) > writer.PACE_STEP
        release.set()
        handle.wait(timeout=60)
    assert overlapped, gathered
    assert_same(fastckpt.load(direct_dir / "ckpt", verify=True), saved)


def test_a_shard_gathers_into_at_most_gather_buffers(direct_dir, monkeypatch):
    """Gather buffers are recycled once written: a shard of many buffers' worth of
    payloads never holds more than GATHER_BUFFERS of them."""
    monkeypatch.setattr(writer, "PACE_STEP", 64 << 10)
    sizes, real = [], fileio.io_buffer
    monkeypatch.setattr(fileio, "io_buffer", lambda n: sizes.append(n) or real(n))
    saved = compressed_only()
    with fastckpt.Checkpointer(compression="zstd", workers=1) as c:
        result = c.save(saved, direct_dir / "ckpt").wait(timeout=60)
    assert result.nbytes > 8 * writer.PACE_STEP  # so every buffer was reused
    assert sizes.count(writer.PACE_STEP) == writer.GATHER_BUFFERS
    assert_same(fastckpt.load(direct_dir / "ckpt", verify=True), saved)


@pytest.mark.parametrize("nth", [1, 2, 7])
def test_failed_gathered_write_fails_the_save(direct_dir, monkeypatch, nth):
    """A write failing on the sink's thread fails the save, naming the shard, with the
    OS error as the cause; the previous checkpoint stays and the engine goes on."""
    path = direct_dir / "ckpt"
    monkeypatch.setattr(writer, "PACE_STEP", 64 << 10)
    before, after = compressed_only(), compressed_only(n=7)
    with fastckpt.Checkpointer(compression="zstd") as c:
        c.save(before, path).wait(timeout=60)
        when = NthMatch(lambda p: p.endswith(".safetensors"), nth)
        monkeypatch.setattr(writer, "fileio", FaultyOS(fileio, pwrite_direct=(errno.EIO, when)))
        with pytest.raises(fastckpt.CheckpointWriteError) as info:
            c.save(after, path).wait(timeout=60)
        assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.EIO
        assert os.path.basename(when.hit) in str(info.value)
        assert sorted(os.listdir(direct_dir)) == ["ckpt"]
        assert_same(fastckpt.load(path, verify=True), before)
        monkeypatch.setattr(writer, "fileio", fileio)
        c.save(after, path).wait(timeout=60)
    assert_same(fastckpt.load(path, verify=True), after)


def test_wait_returns_before_the_replaced_checkpoint_is_removed(ckpt, engine, monkeypatch):
    """The handle completes once the new checkpoint is durable; the one it replaced
    is removed afterwards, and wait_all() waits for that too."""
    release = threading.Event()
    real = checkpointer._remove_replaced

    def held(path):
        release.wait(30)
        real(path)

    monkeypatch.setattr(checkpointer, "_remove_replaced", held)
    engine.save({"v": torch.tensor(1)}, ckpt).wait(timeout=60)
    engine.save({"v": torch.tensor(2)}, ckpt).wait(timeout=60)  # returns, removal held
    assert fastckpt.load(ckpt, verify=True)["v"].item() == 2
    parent = os.path.dirname(ckpt)
    (held_dir,) = [e for e in os.listdir(parent) if e != "ckpt"]
    assert held_dir.startswith(f".ckpt{commit.TMP_TAG}{commit.owner()}-")
    assert fastckpt.load(os.path.join(parent, held_dir))["v"].item() == 1
    release.set()
    engine.wait_all(timeout=60)
    assert os.listdir(parent) == ["ckpt"]


def test_close_waits_for_removals(ckpt, monkeypatch):
    real = checkpointer._remove_replaced
    monkeypatch.setattr(checkpointer, "_remove_replaced",
                        lambda path: (time.sleep(0.3), real(path)))
    with fastckpt.Checkpointer() as c:
        c.save({"v": torch.tensor(1)}, ckpt)
        c.save({"v": torch.tensor(2)}, ckpt)
    assert os.listdir(os.path.dirname(ckpt)) == ["ckpt"]
    assert fastckpt.load(ckpt)["v"].item() == 2


def test_failed_removal_is_logged_and_the_save_stands(ckpt, engine, monkeypatch, caplog):
    real = shutil.rmtree

    def refuse_replaced(path, *args, **kwargs):
        if commit.TMP_TAG in os.path.basename(path) and not kwargs.get("ignore_errors"):
            raise OSError(errno.EIO, "injected", path)
        real(path, *args, **kwargs)

    engine.save({"v": torch.tensor(1)}, ckpt).wait(timeout=60)
    monkeypatch.setattr(checkpointer.shutil, "rmtree", refuse_replaced)
    with caplog.at_level("WARNING", logger="fastckpt"):
        engine.save({"v": torch.tensor(2)}, ckpt).wait(timeout=60)
        engine.wait_all(timeout=60)
    monkeypatch.undo()
    assert "could not remove the replaced checkpoint" in caplog.text
    assert fastckpt.load(ckpt, verify=True)["v"].item() == 2
    engine.save({"v": torch.tensor(3)}, ckpt).wait(timeout=60)  # the engine goes on
    assert fastckpt.load(ckpt)["v"].item() == 3


def test_replaced_checkpoint_is_never_restored_while_being_removed(ckpt, engine, monkeypatch):
    """Where renameat2 is missing, the replaced checkpoint leaves its -old- name before
    its removal starts: a later crash between two renames must bring back the last
    complete checkpoint, not one half deleted."""
    monkeypatch.setattr(commit, "_exchange", lambda a, b: False)
    release = threading.Event()
    real = checkpointer._remove_replaced
    monkeypatch.setattr(checkpointer, "_remove_replaced", lambda p: (release.wait(30), real(p)))
    engine.save({"v": torch.ones(1000)}, ckpt).wait(timeout=60)
    engine.save({"v": torch.full((1000,), 2.0)}, ckpt).wait(timeout=60)
    parent = os.path.dirname(ckpt)
    (held,) = [os.path.join(parent, e) for e in os.listdir(parent) if e != "ckpt"]
    assert os.path.basename(held).startswith(f".ckpt{commit.TMP_TAG}")
    os.remove(shards(held)[0])  # its removal has begun
    dead = _dead_pid()
    os.rename(ckpt, os.path.join(parent, f".ckpt{commit.OLD_TAG}{dead}-abc"))  # killed mid-replace
    assert torch.equal(fastckpt.load(ckpt, verify=True)["v"], torch.full((1000,), 2.0))
    release.set()
    engine.save({"v": torch.full((1000,), 3.0)}, ckpt).wait(timeout=60)
    engine.wait_all(timeout=60)
    assert os.listdir(parent) == ["ckpt"]
    assert torch.equal(fastckpt.load(ckpt, verify=True)["v"], torch.full((1000,), 3.0))


def test_gathered_writes_without_a_thread_of_their_own(direct_dir, monkeypatch):
    """Where no thread can start (a save finishing at interpreter shutdown, on some
    Python versions), the writer writes its gather buffers itself."""
    def no_threads(n, name, nice=0):
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(writer, "PACE_STEP", 64 << 10)
    monkeypatch.setattr(writer, "DaemonPool", no_threads)
    saved = compressed_only()
    with fastckpt.Checkpointer(compression="zstd") as c:
        c.save(saved, direct_dir / "ckpt").wait(timeout=60)
    assert_same(fastckpt.load(direct_dir / "ckpt", verify=True), saved)


EXIT_WITH_A_REMOVAL_PENDING = """
import sys, time, torch, fastckpt
from fastckpt import checkpointer
real = checkpointer._remove_replaced
checkpointer._remove_replaced = lambda p: (time.sleep(0.5), real(p))
engine = fastckpt.Checkpointer()  # never closed
engine.save({"v": torch.ones(1000)}, sys.argv[1]).wait()
engine.save({"v": torch.zeros(1000)}, sys.argv[1]).wait()
"""


def test_exit_waits_for_removals_of_an_unclosed_engine(ckpt):
    subprocess.run([sys.executable, "-c", EXIT_WITH_A_REMOVAL_PENDING, ckpt], check=True,
                   timeout=120)
    assert os.listdir(os.path.dirname(ckpt)) == ["ckpt"]
    assert torch.equal(fastckpt.load(ckpt)["v"], torch.zeros(1000))


@pytest.fixture
def held_commit(monkeypatch):
    """Saves commit only once the returned event is set."""
    release, real = threading.Event(), commit.commit
    monkeypatch.setattr(commit, "commit", lambda *a, **k: (release.wait(30), real(*a, **k)))
    yield release
    release.set()


def test_cancelled_await_leaves_the_save_running(tmp_path, held_commit):
    """A timed-out ``await handle`` must not cancel the save under it, not even one
    still queued behind another."""
    with fastckpt.Checkpointer(max_inflight=2) as engine:
        first = engine.save({"v": torch.ones(3)}, tmp_path / "a")
        queued = engine.save({"v": torch.zeros(3)}, tmp_path / "b")

        async def impatient():
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(queued, 0.1)

        asyncio.run(impatient())
        held_commit.set()
        first.wait(timeout=60)
        assert queued.wait(timeout=60).path == str(tmp_path / "b")
        assert torch.equal(fastckpt.load(tmp_path / "b")["v"], torch.zeros(3))
        for name in ("c", "d"):  # both slots came back
            engine.save({"v": torch.ones(1)}, tmp_path / name)
        engine.wait_all(60)
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c", "d"]


def test_interrupted_wait_leaves_the_failure_for_the_next_save(ckpt, engine, monkeypatch):
    """A wait cut short (a timed-out await) has not seen the save's failure: the next
    save() raises it."""
    release = threading.Event()

    def failing(*args, **kwargs):
        release.wait(30)
        raise fastckpt.CheckpointWriteError("the disk went away")

    monkeypatch.setattr(commit, "commit", failing)
    h = engine.save({"v": torch.ones(2)}, ckpt)

    async def impatient():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(h, 0.1)

    asyncio.run(impatient())
    release.set()
    while not h.done():
        time.sleep(0.01)
    with pytest.raises(fastckpt.CheckpointWriteError, match="the disk went away"):
        engine.save({"v": torch.ones(2)}, ckpt)


def test_a_callback_raising_system_exit_spares_the_engine(ckpt, engine, caplog):
    h = engine.save({"v": torch.ones(2)}, ckpt)
    h.add_done_callback(lambda err: sys.exit("stop"))
    h.wait(timeout=60)
    with caplog.at_level("ERROR", logger="fastckpt"):
        engine.save({"v": torch.zeros(2)}, ckpt).wait(timeout=60)
        late = engine.save({"v": torch.full((2,), 2.0)}, ckpt)
        late.add_done_callback(lambda err: sys.exit("stop"))
        late.wait(timeout=60)
        engine.save({"v": torch.full((2,), 3.0)}, ckpt).wait(timeout=60)
    assert fastckpt.load(ckpt)["v"][0] == 3.0


def test_close_during_a_save_waits_for_it(tmp_path, monkeypatch):
    """close() on one thread while save() stages on another: the save completes and
    commits, close() returns after it, and nothing is left behind."""
    engine = fastckpt.Checkpointer()
    staging, release = threading.Event(), threading.Event()
    real = Stager.stage_shard

    def slow(self, *args):
        staging.set()
        release.wait(30)
        return real(self, *args)

    monkeypatch.setattr(Stager, "stage_shard", slow)
    out = {}
    saver = threading.Thread(target=lambda: out.update(
        result=engine.save({"v": torch.ones(4)}, tmp_path / "a").wait(60)))
    saver.start()
    assert staging.wait(30)
    closer = threading.Thread(target=engine.close)
    closer.start()
    time.sleep(0.2)
    assert closer.is_alive()  # waiting for the save being staged
    release.set()
    saver.join(60)
    closer.join(60)
    assert "result" in out and sorted(os.listdir(tmp_path)) == ["a"]
    assert torch.equal(fastckpt.load(tmp_path / "a")["v"], torch.ones(4))


def test_interrupt_while_handing_blocks_over(tmp_path, monkeypatch):
    """Ctrl-C arriving while staged blocks are handed to the writers: the writers are
    released with the blocks not yet handed over, and the engine goes on."""
    class Interrupting(queue.Queue):
        puts = 0

        def put(self, item, *args, **kwargs):
            type(self).puts += 1
            if type(self).puts == 3:
                raise KeyboardInterrupt
            super().put(item, *args, **kwargs)

    state = {f"w{i}": torch.ones(1 << 18) for i in range(8)}
    with fastckpt.Checkpointer(workers=2, shard_size=1 << 20) as engine:
        monkeypatch.setattr(checkpointer.queue, "Queue", Interrupting)
        with pytest.raises(KeyboardInterrupt):
            engine.save(state, tmp_path / "a")
        monkeypatch.undo()
        engine.save(state, tmp_path / "b").wait(timeout=60)  # the writers were let go
    assert sorted(os.listdir(tmp_path)) == ["b"]


def test_failed_recovery_of_a_crashed_replace_is_a_checkpoint_error(ckpt, engine, monkeypatch):
    """A crashed save's replaced checkpoint, left under its -old- name, is moved back
    before the next save of that path; if the OS refuses, a CheckpointWriteError says
    so (and the old checkpoint stays where it is)."""
    engine.save({"v": torch.ones(2)}, ckpt).wait(timeout=60)
    old = os.path.join(os.path.dirname(ckpt), f".{os.path.basename(ckpt)}{commit.OLD_TAG}999999-x")
    os.rename(ckpt, old)  # as a save killed between its two renames leaves it
    monkeypatch.setattr(commit, "os", FaultyOS(os, rename=(errno.EIO, always)))
    with pytest.raises(fastckpt.CheckpointWriteError, match="Errno 5"):
        engine.save({"v": torch.zeros(2)}, ckpt)
    monkeypatch.undo()
    assert torch.equal(fastckpt.load(ckpt)["v"], torch.ones(2))  # found under its old name
