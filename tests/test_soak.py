"""Memory soak: saving the same state again and again holds memory, threads and file
descriptors flat, and closing the engine gives everything back."""

import threading

import psutil
import torch

import fastckpt

SAVES = {"quick": 30, "long": 200}
WARMUP = 5  # allocator arenas and the staging pool settle within the first saves
STATE_BYTES = 8 << 20
# Measured here: a slope of ~2 KiB per save (Python's own caches), no trend beyond it.
# A leak worth finding keeps something per save: a staging block (1 MiB and up), a
# tensor, a shard's bytes, a header. 64 KiB per save is 1/128 of the state: 30x the
# noise, and 12 MiB over the long profile's 200 saves.
MAX_SLOPE = 64 << 10


def slope(ys):
    """Least-squares slope of ``ys`` against 0, 1, 2, ..."""
    n = len(ys)
    mx, my = (n - 1) / 2, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in enumerate(ys))
    sxx = sum((x - mx) ** 2 for x in range(n))
    return sxy / sxx


def test_repeated_saves_stay_flat(tmp_path, profile, figures):
    state = {f"w{i}": torch.randn(STATE_BYTES // 4 // 8) for i in range(8)}
    me = psutil.Process()
    threads, fds = threading.active_count(), me.num_fds()
    engine = fastckpt.Checkpointer(workers=2, staging_budget=16 << 20, shard_size=2 << 20)
    rss, pool = [], []
    for _ in range(SAVES[profile]):
        engine.save(state, tmp_path / "ckpt").wait(timeout=60)
        rss.append(me.memory_info().rss)
        pool.append(engine._pool.allocated)
    engine.close()
    growth = slope(rss[WARMUP:])
    figures[f"soak.{profile}.saves"] += len(rss)
    figures[f"soak.{profile}.rss_slope_bytes_per_save"] = round(growth)
    figures[f"soak.{profile}.rss_growth_after_warmup_bytes"] = rss[-1] - rss[WARMUP]
    assert growth < MAX_SLOPE, f"RSS grows {growth / 1024:.0f} KiB per save"
    assert 0 < pool[0] <= 16 << 20 and set(pool) == {pool[0]}, "staging pool not reused"
    assert engine._pool.allocated == 0, "close() kept staging buffers"
    assert threading.active_count() == threads, "close() left threads running"
    assert me.num_fds() == fds, "a save leaked file descriptors"


def test_repeated_loads_and_verifies_leak_nothing(tmp_path):
    path = tmp_path / "ckpt"
    with fastckpt.Checkpointer(shard_size=1 << 20) as c:
        c.save({f"w{i}": torch.randn(1 << 18) for i in range(4)}, path).wait(timeout=60)
    me = psutil.Process()
    fastckpt.load(path, verify=True)  # warm-up: thread pools, imports
    threads, fds = threading.active_count(), me.num_fds()
    for mmap in (True, False) * 10:
        out = fastckpt.load(path, mmap=mmap, verify=True)
        assert fastckpt.verify(path).ok
        del out
    assert me.num_fds() == fds and threading.active_count() == threads
