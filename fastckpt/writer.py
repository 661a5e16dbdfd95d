"""Background shard writer: checksum each block, write it, fsync the shard.

One writer consumes one shard's blocks in order from a queue. Whatever happens, it
keeps draining the queue and returning buffers to the pool, so a failed write can
never leave the caller waiting on staging memory that nobody will free.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future, wait
from dataclasses import dataclass, field

from . import checksum as ck
from . import codec, fileio
from .errors import CheckpointWriteError
from .plan import ShardPlan, Stored, shard_header
from .staging import Block, StagingPool

log = logging.getLogger("fastckpt")


@dataclass
class ShardResult:
    """A written shard: its size and checksum, and per tensor the manifest fields the
    writer learned (checksums; offsets and chunk tables of compressed tensors)."""

    file: str
    size: int
    checksum: str | None
    tensors: dict[str, dict] = field(default_factory=dict)


@dataclass
class Compression:
    """How a shard's compressed tensors are encoded. ``adaptive``: the writer keeps
    pace with the disk and stores raw every chunk the encoders have not finished by
    the time it is due (``compression="auto"``)."""

    level: int
    executor: DaemonPool
    adaptive: bool = False


# A buffered writer starts writeback every PACE_STEP bytes (each call walks the file's
# cached pages); an adaptive one also lets at most PACE_WINDOW bytes of its shard wait
# for the disk before it waits too: enough to keep the disk busy, little enough that
# the encoders get the disk's time. PACE_STEP is also the direct writer's request size.
PACE_WINDOW = 32 << 20
PACE_STEP = 8 << 20
# Gather buffers per shard: the writer fills one while the sink's thread writes another.
GATHER_BUFFERS = 2


class DaemonPool:
    """Threads that run hashing (or encoding) beside the writers.

    Not a ThreadPoolExecutor: those refuse new work once interpreter shutdown has
    begun, while an exiting program still waits (atexit) for its saves to finish.
    """

    def __init__(self, n: int, name: str, nice: int = 0) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, args=(nice,), name=f"{name}-{i}",
                                          daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def _run(self, nice: int) -> None:
        if nice:
            _lower_priority(nice)
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


def _lower_priority(nice: int) -> None:
    """Raise this thread's nice value by ``nice`` (Linux threads have their own), so that
    it only takes CPU time that other threads leave."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except (AttributeError, OSError):  # no per-thread priorities here: run as is
        pass


def write_all(fd: int, data) -> None:
    """``os.write`` until every byte is written (it may write less on large buffers)."""
    mv = memoryview(data).cast("B")
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def pwrite_all(fd: int, data, offset: int) -> None:
    """``os.pwrite`` until every byte is written."""
    mv = memoryview(data).cast("B")
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


class _Digests:
    """Streaming per-tensor digests over the pieces of each block (the bytes as
    staged, i.e. before any compression)."""

    def __init__(self, kind: str | None) -> None:
        self.kind = kind
        self.open: dict[str, ck.Hasher] = {}
        self.done: dict[str, str | None] = {}

    def update(self, block: Block, data: memoryview) -> None:
        if self.kind is None:
            return
        for piece in block.pieces:
            s, b = piece[0], piece[2]
            h = self.open.get(s.name)
            if h is None:
                h = self.open[s.name] = ck.new_hasher(self.kind)
            h.update(_piece(data, piece))
            if b == s.nbytes:
                self.done[s.name] = self.open.pop(s.name).hexdigest()

    def get(self, name: str) -> str | None:
        if self.kind is None:
            return None
        return self.done.get(name) or ck.digest(self.kind, b"")  # empty tensors


class _Sink:
    """Writes a shard's data section, in order, after its header.

    Where the shard is laid out for it and the filesystem allows, the bytes go to the
    disk through O_DIRECT: the page-cache copy and its writeback cost a core about as
    much time as the disk takes, which on a small machine is time taken from training
    and from the encoders. Whole aligned blocks of staging memory are written as they
    are; anything else (encoded payloads, a block's tail) is gathered into aligned
    buffers first. A full gather buffer is written by a thread of the sink's own while
    the writer fills the next, so that the writer's share of the work (gathering,
    hashing the payloads) overlaps the disk's instead of adding to it. Direct writes
    wait for the disk, so they need no pacing.

    Every write happens at :attr:`pos`, one at a time: the sink's thread takes them
    in order, and the writer only writes itself once that thread is idle."""

    def __init__(self, fd: int, path: str, shard: ShardPlan, direct: bool,
                 adaptive: bool) -> None:
        self.fd, self.path, self.adaptive = fd, path, adaptive
        self.pos = len(shard.header)  # file offset of the next byte not yet written
        self.flushed = self.paced = 0  # buffered: writeback started / waited for up to here
        self.direct_fd = fileio.open_direct(path, write=True) if direct and shard.direct else None
        self.pending: memoryview | None = None  # direct: bytes gathered, not yet written
        self.fill = 0
        self.spare: list[memoryview] = []  # gather buffers whose writes are done
        self.inflight: collections.deque[tuple[Future, memoryview]] = collections.deque()
        self.flusher: DaemonPool | None = None
        self.threadless = False  # no thread could be started: write on the writer's

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        if self.direct_fd is None and self.pending is None:
            self._put_now(mv)
            return
        if not self.fill and len(mv) >= fileio.DIRECT_ALIGN and fileio.aligned(mv):
            body = len(mv) - len(mv) % fileio.DIRECT_ALIGN
            self._put_now(mv[:body])
            mv = mv[body:]
        while mv:
            if self.pending is None:
                self.pending = self._buffer()
            n = min(len(mv), PACE_STEP - self.fill)
            fileio.copy_into(self.pending[self.fill : self.fill + n], mv[:n])
            self.fill, mv = self.fill + n, mv[n:]
            if self.fill == PACE_STEP:
                self._flush()

    def finish(self) -> None:
        """Write what is still gathered, once the writes in flight are done (a shard
        that never filled a gather buffer needs no thread of its own)."""
        self._drain()
        if self.fill:
            self._put(self.pending[: self.fill])
            self.pending, self.fill = None, 0

    def _buffer(self) -> memoryview:
        """A gather buffer: a spare one, a new one while fewer than GATHER_BUFFERS
        exist, or else the oldest in flight once its write is done."""
        if self.spare:
            return self.spare.pop()
        if len(self.inflight) < GATHER_BUFFERS:  # then every buffer is in flight
            return fileio.io_buffer(PACE_STEP)
        fut, buf = self.inflight.popleft()
        fut.result()
        return buf

    def _flush(self) -> None:
        buf, data = self.pending, self.pending[: self.fill]
        self.pending, self.fill = None, 0
        flusher = self._flusher()
        if flusher is None:
            self._put_now(data)
            self.spare.append(buf)
        else:
            self.inflight.append((flusher.submit(self._put, data), buf))

    def _flusher(self) -> DaemonPool | None:
        """The sink's thread, started on first use; None where no thread can start (a
        save finishing while the interpreter shuts down, on some Python versions)."""
        if self.flusher is None and not self.threadless:
            try:
                self.flusher = DaemonPool(1, "fastckpt-flush")
            except RuntimeError:
                self.threadless = True
        return self.flusher

    def _drain(self) -> None:
        """Wait for every gathered write in flight; raises the first one's error."""
        while self.inflight:
            fut, buf = self.inflight.popleft()
            fut.result()
            self.spare.append(buf)

    def _put_now(self, buf: memoryview) -> None:
        self._drain()
        self._put(buf)

    def _put(self, buf: memoryview) -> None:
        """Write ``buf`` at :attr:`pos` through O_DIRECT (a final partial block goes
        through the page cache), or else buffered, starting writeback as it goes."""
        if self.direct_fd is not None:
            try:
                fileio.pwrite_direct(self.direct_fd, self.pos, buf)
                self.pos += len(buf)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # Accepted at open, refused on writing (a larger block size, say): go
                # on through the page cache.
                log.info("%s: O_DIRECT write refused (%s); writing it buffered", self.path, e)
                self._close_direct()
                os.lseek(self.fd, self.pos, os.SEEK_SET)
        write_all(self.fd, buf)
        self.pos += len(buf)
        self._pace()

    def _pace(self) -> None:
        """Start writeback every ``PACE_STEP`` bytes: data arrives at the stager's or
        the encoders' pace, and waiting for the end would leave the disk idle
        meanwhile. An adaptive writer also keeps at most ``PACE_WINDOW`` bytes of this
        shard waiting for the disk."""
        end = self.pos
        if end < self.flushed + PACE_STEP:
            return
        fileio.start_writeback(self.fd, self.flushed, end - self.flushed)
        self.flushed = end
        if self.adaptive and end - PACE_WINDOW >= self.paced + PACE_STEP:
            self.paced = end - PACE_WINDOW
            fileio.wait_writeback(self.fd, self.paced)

    def close(self) -> None:
        """Wait for the writes in flight (their errors were raised or are moot), stop
        the sink's thread and close the O_DIRECT descriptor."""
        wait([fut for fut, _ in self.inflight])
        self.inflight.clear()
        if self.flusher is not None:
            self.flusher.shutdown()
            self.flusher = None
        self._close_direct()

    def _close_direct(self) -> None:
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None


class _Encoder:
    """Encodes the compressed tensors' pieces and appends their payloads after the
    shard's uncompressed tensors, tracking each payload's offsets, chunk table and
    on-disk digest."""

    def __init__(self, shard: ShardPlan, kind: str | None, opts: Compression) -> None:
        self.kind, self.opts = kind, opts
        self.cursor = shard.raw_bytes  # relative to the data section
        self.spans: dict[str, list[int]] = {}
        self.chunks: dict[str, list] = {}
        self.hashers: dict[str, ck.Hasher] = {}

    def start(self, s: Stored, piece: memoryview) -> codec.Encoding:
        """Queue the chunks of one piece of ``s`` on the encoders."""
        dt, opts = s.source.dtype, self.opts
        return codec.Encoding(piece, dt.itemsize, dt.is_floating_point, opts.level,
                              opts.executor, opts.adaptive)

    def write(self, sink: _Sink, s: Stored, encoding: codec.Encoding) -> None:
        """Append the payload of a piece started with :meth:`start`."""
        if s.name not in self.spans:
            self.spans[s.name] = [self.cursor, self.cursor]
            self.chunks[s.name] = []
            if self.kind is not None:
                self.hashers[s.name] = ck.new_hasher(self.kind)
        for part, meta in encoding:
            self.chunks[s.name].append(meta)
            if self.kind is not None:
                self.hashers[s.name].update(part)
            sink.write(part)
            self.cursor += len(part)
        self.spans[s.name][1] = self.cursor

    def entry(self, name: str, raw_digest: str | None) -> dict:
        h = self.hashers.get(name)
        return {"offsets": self.spans[name], "checksum": h.hexdigest() if h else None,
                "raw_checksum": raw_digest,
                "codec": {"codec": "zstd", "level": self.opts.level, "chunks": self.chunks[name]}}


def write_shard(
    shard: ShardPlan,
    directory: str,
    blocks: queue.Queue[Block | None],
    pool: StagingPool,
    checksum: str | None,
    hashers: DaemonPool,
    compression: Compression | None = None,
    direct: bool = False,
) -> ShardResult:
    """Write ``shard`` into ``directory`` from the blocks arriving on ``blocks``
    (``None`` ends the stream), hashing each block on ``hashers`` and encoding the
    tensors the plan marked for compression. ``direct``: write the data section
    through O_DIRECT where possible (a staging block written from in place then
    returns to ``pool`` only once its bytes are on the disk).

    Raises :class:`CheckpointWriteError` naming the file."""
    path = os.path.join(directory, shard.file)
    digests = _Digests(checksum)
    encoder = _Encoder(shard, checksum, compression) if shard.compressed else None
    sink: _Sink | None = None
    error: BaseException | None = None
    fd = -1
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        sink = _Sink(fd, path, shard, direct, encoder is not None and compression.adaptive)
        write_all(fd, shard.header)  # a compressed shard's is rewritten at the end
    except OSError as e:
        error = e
    for job in _started(blocks, encoder if error is None else None):
        try:
            if error is None:
                data = job.data()
                # Hash on another thread while this one writes: both release the GIL,
                # so the checksum hides behind the write instead of adding to it.
                hashed = hashers.submit(digests.update, job.block, data)
                try:
                    if encoder is None:
                        sink.write(data)
                    else:
                        _write_encoded(sink, job, data, encoder)
                finally:
                    hashed.result()
        except BaseException as e:  # noqa: BLE001 - reported below, after draining
            error = error or e
        finally:
            job.cancel()  # after a failed write: no work left queued on this block
            pool.release(job.block.buf)
    try:
        if error is None:
            sink.finish()
            result = _finish(fd, shard, digests, encoder)
            os.fsync(fd)
    except (OSError, ValueError) as e:
        error = e
    finally:
        if sink is not None:
            sink.close()
        if fd >= 0:
            os.close(fd)
    if error is not None:
        raise CheckpointWriteError(f"writing {path} failed: {error}") from error
    return result


class _Job:
    """A block taken from the queue, with the encodings of its compressed pieces
    already queued on the encoders (or the error that starting them raised)."""

    def __init__(self, block: Block, encoder: _Encoder | None) -> None:
        self.block, self.encodings, self.error = block, {}, None
        if encoder is None:
            return
        try:
            data = block.ready()
            for i, piece in enumerate(block.pieces):
                if piece[0].compress:
                    self.encodings[i] = encoder.start(piece[0], _piece(data, piece))
        except BaseException as e:  # noqa: BLE001 - raised by data(), in the write loop
            self.error = e

    def data(self) -> memoryview:
        if self.error is not None:
            raise self.error
        return self.block.ready()

    def cancel(self) -> None:
        for encoding in self.encodings.values():
            encoding.cancel()


# How many blocks a compressed shard's writer starts encoding beyond the one it is
# writing: without it the encoders run dry each time the writer waits for the disk.
LOOKAHEAD = 1


def _started(blocks: queue.Queue, encoder: _Encoder | None) -> Iterator[_Job]:
    """The blocks of ``blocks`` in order, as started jobs. For a compressed shard, up
    to :data:`LOOKAHEAD` blocks already queued are started before one is handed out;
    it only ever waits on the queue with no block held, so a writer never keeps a
    buffer the stager is waiting for while it waits for the stager."""
    depth = LOOKAHEAD if encoder is not None else 0
    ahead: collections.deque[_Job] = collections.deque()
    done = False
    while ahead or not done:
        while not done and len(ahead) <= depth:
            try:
                block = blocks.get(block=not ahead)
            except queue.Empty:
                break
            if block is None:
                done = True
            else:
                ahead.append(_Job(block, encoder))
        if ahead:
            yield ahead.popleft()


def _piece(data: memoryview, piece: tuple) -> memoryview:
    _, a, b, dst = piece
    return data[dst : dst + (b - a)]


def _write_encoded(sink: _Sink, job: _Job, data: memoryview, encoder: _Encoder) -> None:
    # The data section is written in order: a compressed shard's uncompressed tensors
    # come first, then the payloads. Every compressed piece of the block was queued
    # when the job started, so the encoders work ahead of the writer across pieces,
    # small tensors included.
    for i, piece in enumerate(job.block.pieces):
        if i in job.encodings:
            encoder.write(sink, piece[0], job.encodings[i])
        else:
            sink.write(_piece(data, piece))


def _finish(fd: int, shard: ShardPlan, digests: _Digests, encoder: _Encoder | None
            ) -> ShardResult:
    """Write the real header of a compressed shard, and sum up what was written."""
    header, size = shard.header, shard.size
    tensors = {s.name: {"checksum": digests.get(s.name)} for s in shard.stored}
    if encoder is not None:
        header = shard_header(shard.stored, {n: tuple(v) for n, v in encoder.spans.items()},
                              pad_to=len(shard.header))
        pwrite_all(fd, header, 0)
        size = len(header) + encoder.cursor
        for name in encoder.spans:
            tensors[name] = encoder.entry(name, digests.get(name))
    shard_digest = None
    if digests.kind is not None:
        on_disk = [tensors[s.name]["checksum"] for s in shard.stored]
        shard_digest = ck.shard_digest(digests.kind, header, on_disk)
    return ShardResult(shard.file, size, shard_digest, tensors)
