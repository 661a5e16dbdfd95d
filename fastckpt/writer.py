"""Background shard writer: checksum each block, write it, fsync the shard.

One writer consumes one shard's blocks in order from a queue. Whatever happens, it
keeps draining the queue and returning buffers to the pool, so a failed write can
never leave the caller waiting on staging memory that nobody will free.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from . import checksum as ck
from .errors import CheckpointWriteError
from .plan import ShardPlan
from .staging import Block, StagingPool


@dataclass
class ShardResult:
    file: str
    size: int
    checksum: str | None
    tensor_checksums: dict[str, str | None] = field(default_factory=dict)


class DaemonPool:
    """Threads that run hashing beside the writers.

    Not a ThreadPoolExecutor: those refuse new work once interpreter shutdown has
    begun, while an exiting program still waits (atexit) for its saves to finish.
    """

    def __init__(self, n: int, name: str) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(n)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        for fn, args, fut in iter(self._q.get, None):
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - handed to the waiter
                    fut.set_exception(e)

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        self._q.put((fn, args, fut))
        return fut

    def shutdown(self) -> None:
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join()


def write_all(fd: int, data) -> None:
    """``os.write`` until every byte is written (it may write less on large buffers)."""
    mv = memoryview(data).cast("B")
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


class _Digests:
    """Streaming per-tensor digests over the pieces of each block."""

    def __init__(self, kind: str | None) -> None:
        self.kind = kind
        self.open: dict[str, ck.Hasher] = {}
        self.done: dict[str, str | None] = {}

    def update(self, block: Block, data: memoryview) -> None:
        if self.kind is None:
            return
        for s, a, b, dst in block.pieces:
            h = self.open.get(s.name)
            if h is None:
                h = self.open[s.name] = ck.new_hasher(self.kind)
            h.update(data[dst : dst + (b - a)])
            if b == s.nbytes:
                self.done[s.name] = self.open.pop(s.name).hexdigest()

    def result(self, shard: ShardPlan) -> tuple[dict[str, str | None], str | None]:
        if self.kind is None:
            return {s.name: None for s in shard.stored}, None
        empty = ck.digest(self.kind, b"")
        digests = {s.name: self.done.get(s.name, empty) for s in shard.stored}
        return digests, ck.shard_digest(self.kind, shard.header, list(digests.values()))


def write_shard(
    shard: ShardPlan,
    directory: str,
    blocks: queue.Queue[Block | None],
    pool: StagingPool,
    checksum: str | None,
    hashers: DaemonPool,
) -> ShardResult:
    """Write ``shard`` into ``directory`` from the blocks arriving on ``blocks``
    (``None`` ends the stream), hashing each block on ``hashers``.

    Raises :class:`CheckpointWriteError` naming the file."""
    path = os.path.join(directory, shard.file)
    digests = _Digests(checksum)
    error: BaseException | None = None
    fd = -1
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        write_all(fd, shard.header)
    except OSError as e:
        error = e
    for block in iter(blocks.get, None):
        try:
            if error is None:
                data = block.ready()
                # Hash on another thread while this one writes: both release the GIL,
                # so the checksum hides behind the write instead of adding to it.
                hashed = hashers.submit(digests.update, block, data)
                try:
                    write_all(fd, data)
                finally:
                    hashed.result()
        except BaseException as e:  # noqa: BLE001 - reported below, after draining
            error = error or e
        finally:
            pool.release(block.buf)
    try:
        if error is None:
            os.fsync(fd)
    except OSError as e:
        error = e
    finally:
        if fd >= 0:
            os.close(fd)
    if error is not None:
        raise CheckpointWriteError(f"writing {path} failed: {error}") from error
    tensor_digests, shard_digest = digests.result(shard)
    return ShardResult(shard.file, shard.size, shard_digest, tensor_digests)
