"""Concurrency: engines and threads saving at once, and save() called faster than
the disk drains, with the staging pool held to its budget throughout."""

import os
import threading
import time

import pytest
import torch
from conftest import assert_same

import fastckpt
from fastckpt import writer

ROUNDS = {"quick": 4, "long": 40}


def state(k, n=4, width=64 * 1024):
    return {"step": k, **{f"w{i}": torch.full((width,), float(k * 10 + i)) for i in range(n)}}


def run_threads(targets):
    errors = []
    start = threading.Barrier(len(targets))

    def guarded(fn):
        try:
            start.wait(timeout=30)
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a saving thread hung"
    if errors:
        raise errors[0]


def saver(engine, path, rounds, offset):
    def run():
        for r in range(rounds):
            engine.save(state(offset + r), path).wait(timeout=60)
            assert_same(fastckpt.load(path, verify=True), state(offset + r))

    return run


def test_two_engines_two_threads(tmp_path, profile, figures):
    rounds = ROUNDS[profile]
    with fastckpt.Checkpointer(workers=2) as a, fastckpt.Checkpointer(workers=2) as b:
        run_threads([saver(a, tmp_path / "a", rounds, 0), saver(b, tmp_path / "b", rounds, 100)])
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]
    figures["concurrency.saves_two_engines"] += 2 * rounds


def test_one_engine_two_threads(tmp_path, profile, figures):
    rounds = ROUNDS[profile]
    with fastckpt.Checkpointer(workers=2, staging_budget=1 << 20) as c:
        run_threads([saver(c, tmp_path / "a", rounds, 0), saver(c, tmp_path / "b", rounds, 100)])
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]
    figures["concurrency.saves_one_engine"] += 2 * rounds


WRITE_DELAY_S = 0.01


class SlowDisk:
    """``os`` for fastckpt.writer, with every write delayed: a disk slower than the
    training loop's save() calls."""

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        time.sleep(WRITE_DELAY_S)
        return os.write(fd, data)


class PoolWatch:
    """Samples the staging pool's size on a thread of its own, keeping the peak."""

    def __init__(self, pool):
        self.pool, self.peak = pool, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.pool.allocated)
            time.sleep(0.0002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize("width", [64 * 1024, 512 * 1024], ids=["fits", "streams"])
def test_back_pressure_bounds_staging(tmp_path, monkeypatch, profile, width, figures):
    budget = 4 << 20  # "streams": each 8 MiB state is staged in pieces
    monkeypatch.setattr(writer, "os", SlowDisk())
    saves = 3 * ROUNDS[profile]
    with fastckpt.Checkpointer(workers=2, staging_budget=budget, shard_size=1 << 20,
                               max_inflight=2) as c, PoolWatch(c._pool) as watch:
        handles = [c.save(state(k, width=width), tmp_path / f"s{k}") for k in range(saves)]
        for h in handles:
            h.wait(timeout=120)
    assert 0 < watch.peak <= budget
    # The disk was the bottleneck: save() had to wait for it.
    assert max(h.stall_s for h in handles) > WRITE_DELAY_S
    for k in range(saves):
        assert_same(fastckpt.load(tmp_path / f"s{k}", verify=True), state(k, width=width))
    figures["concurrency.back_pressure_saves"] += saves
    figures["concurrency.peak_staging_pct_of_budget"] = max(
        figures["concurrency.peak_staging_pct_of_budget"], round(100 * watch.peak / budget))
