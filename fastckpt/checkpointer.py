"""The engine: ``Checkpointer`` runs plan and stage on the caller's thread and hands
write, fsync and commit to background threads, returning a ``SaveHandle``."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures as cf
import contextlib
import logging
import os
import queue
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

import psutil
import torch

from . import codec, commit, dist, reader
from . import manifest as mf
from .checksum import check_kind
from .errors import CheckpointError, CheckpointWriteError
from .plan import Plan, make_plan, manifest_tensor
from .staging import Stager, StagingPool
from .tree import flatten
from .writer import Compression, DaemonPool, ShardResult, write_shard

log = logging.getLogger("fastckpt")
PathLike = Union[str, "os.PathLike[str]"]
_UNSET: Any = object()


def _default_budget() -> int:
    return min(8 << 30, psutil.virtual_memory().total // 4)


@dataclass(frozen=True)
class SaveResult:
    """What a finished save produced.

    ``stall_s`` is how long ``save()`` blocked its caller; ``total_s`` runs from the
    call to the durable commit.
    """

    path: str
    nbytes: int
    stall_s: float
    total_s: float
    num_shards: int
    num_tensors: int


class SaveHandle:
    """A save in flight. ``wait()`` returns its :class:`SaveResult` or raises the
    background failure as a :class:`CheckpointError`; ``await handle`` does the same
    without blocking an event loop."""

    def __init__(self, future: cf.Future[SaveResult], path: str, stall_s: float) -> None:
        self._future = future
        self.path = path
        self.stall_s = stall_s
        self.reported = False

    def done(self) -> bool:
        """True once the save has committed or failed."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> SaveResult:
        """Block until the save is durable; raises ``TimeoutError`` after ``timeout`` s."""
        try:
            return self._future.result(timeout)
        except cf.TimeoutError:
            raise TimeoutError(f"save to {self.path} still running after {timeout} s") from None
        finally:
            self._seen()

    def _seen(self) -> None:
        # Only the save's own failure counts as reported: an interrupted wait (Ctrl-C,
        # a cancelled await) leaves it for the next save() to raise.
        if self._future.done() and self._future.exception() is not None:
            self.reported = True

    def add_done_callback(self, fn: Callable[[BaseException | None], Any]) -> None:
        """Call ``fn(error)`` once the save has committed (``error`` is None) or failed.

        ``fn`` runs on the committing thread (or at once if the save is already
        done) and must not block. Observing a failure here does not count as seeing
        it: ``wait()`` and the next ``save()`` still raise it.
        """
        self._future.add_done_callback(lambda f: _call_back(fn, f.exception(), self.path))

    def __await__(self):
        return self._awaitable().__await__()

    async def _awaitable(self) -> SaveResult:
        try:
            # Shielded: a cancelled await (a timeout, say) must not cancel the save.
            return await asyncio.shield(asyncio.wrap_future(self._future))
        finally:
            self._seen()


def _call_back(fn: Callable[[BaseException | None], Any], error: BaseException | None,
               path: str) -> None:
    """Run a done-callback on the committing thread, which must survive whatever it
    raises (concurrent.futures only catches ``Exception``)."""
    try:
        fn(error)
    except BaseException:  # noqa: BLE001 - logged; the engine's thread goes on
        log.exception("done-callback of the save to %s raised", path)


class Checkpointer:
    """The checkpoint engine behind :func:`fastckpt.save` / :func:`fastckpt.load`.

    Args:
        workers: background threads writing shards.
        shard_size: target bytes per shard file (a larger tensor gets a shard of its own).
        checksum: ``"xxh3"`` (default), ``"sha256"`` or ``None``.
        staging_budget: bytes of staging buffers kept for reuse across saves; a state
            larger than this is staged in pieces (default: min(8 GiB, RAM / 4)).
        max_inflight: saves allowed in flight; the next ``save()`` waits for the oldest.
        pin_memory: pin staging buffers (default: when CUDA is available).
        compression: ``None`` (default), ``"zstd"``: byte-grouped, chunked zstd of
            every tensor of at least 64 KiB, done by the background threads; or
            ``"auto"``: the same, but a chunk the background threads cannot compress
            before the disk is ready for it is stored raw, so that the writers never
            wait for compression (the ratio then depends on the CPU and disk at hand).
        compression_level: zstd level (default 1, the fastest that compresses best).
        process_group: the ``torch.distributed`` group whose ranks save together
            (default: the default group when torch.distributed is initialised with
            more than one rank); ``False`` saves from this process alone.
        collective_timeout: seconds a rank waits for the others to finish a save
            before the save fails (and the checkpoint is not committed).
        direct_io: write the data of shards of 256 KiB or more to the disk with
            O_DIRECT (from the staging buffers, or compressed from an aligned buffer),
            bypassing the page cache, where the filesystem supports it and the state
            fits in ``staging_budget`` or the caller waits for the writes anyway (as
            the DCP plugin's ``write_data`` does) (default True); False writes
            everything through the page cache.

    Use as a context manager, or call :meth:`close` to wait for in-flight saves.
    """

    def __init__(
        self,
        *,
        workers: int | None = None,
        shard_size: int = 512 << 20,
        checksum: str | None = "xxh3",
        staging_budget: int | None = None,
        max_inflight: int = 2,
        pin_memory: bool | None = None,
        compression: str | None = None,
        compression_level: int | None = None,
        process_group: Any = None,
        collective_timeout: float = dist.COLLECTIVE_TIMEOUT,
        direct_io: bool = True,
    ) -> None:
        if shard_size <= 0 or max_inflight < 1:
            raise ValueError("shard_size must be > 0 and max_inflight >= 1")
        self.workers = workers or min(8, max(4, os.cpu_count() or 4))
        self.shard_size = shard_size
        self.checksum = check_kind(checksum)
        if compression is None and compression_level is not None:
            raise ValueError("compression_level given without compression")
        _check_compression(compression, compression_level)
        self.compression, self.compression_level = compression, compression_level
        self.max_inflight = max_inflight
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._pool = StagingPool(staging_budget or _default_budget(), pin)
        self._stager = Stager(self._pool)
        self._writers = cf.ThreadPoolExecutor(self.workers, thread_name_prefix="fastckpt-write")
        self._hashers = DaemonPool(self.workers, "fastckpt-hash")
        # Codec chunks run on their own threads: the writer that waits for them must
        # not be holding the only worker that could run them. One per core, as the work
        # is all CPU, and at a lower priority, so that compression only takes the CPU
        # time that training and the rest of the save leave (under "auto" nothing
        # waits for it).
        self._encoders = DaemonPool(min(self.workers, os.cpu_count() or 1), "fastckpt-encode",
                                    nice=10)
        # One committer thread: saves commit in the order they were made.
        self._committer = cf.ThreadPoolExecutor(1, thread_name_prefix="fastckpt-commit")
        # A replaced checkpoint is removed after its replacement's handle completes:
        # unlinking a GiB took 0.13-0.19 s of 0.5-0.6 s saves on the test machine.
        self._remover = DaemonPool(1, "fastckpt-remove")
        self._removals: list[cf.Future] = []
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._lock = threading.Lock()  # one save() stages at a time
        self._handles: list[SaveHandle] = []
        self._closed = False
        self.process_group, self.collective_timeout = process_group, collective_timeout
        self.direct_io = direct_io
        self._local = _Local(self._remove_later)
        _engines.add(self)
        self._scopes: dict[Any, Any] = {}

    # -- saving -------------------------------------------------------------------

    def save(
        self,
        obj: Any,
        path: PathLike,
        *,
        metadata: Mapping[str, Any] | None = None,
        checksum: str | None = _UNSET,
        shard_size: int | None = None,
        compression: str | None = _UNSET,
        compression_level: int | None = None,
        per_rank: Any = None,
        process_group: Any = _UNSET,
    ) -> SaveHandle:
        """Snapshot ``obj`` and write it to ``path`` in the background.

        Returns once every tensor is copied out (the caller may then modify them).
        Raises :class:`UnsupportedTypeError` for values that cannot be stored
        without pickle (nothing is written), and any earlier background failure not
        yet seen through its handle.

        Under ``torch.distributed`` (see :mod:`fastckpt.dist` and docs/DISTRIBUTED.md)
        every rank of ``process_group`` calls ``save``: ``obj`` is the state that is
        identical on every rank (written once, split across the ranks), ``per_rank``
        this rank's own state; the checkpoint commits once, when all ranks are done.
        """
        t0 = time.perf_counter()
        group = self.process_group if process_group is _UNSET else process_group
        with self._lock:
            self._check_open()
            scope = self._scope(group, per_rank)
            try:
                scope.start()
                # Arguments are checked inside: a rank refusing its own still takes
                # part in the commit round (below), or the ranks would pair up rounds
                # of different saves.
                path = os.path.abspath(os.fspath(path))
                kind = self.checksum if checksum is _UNSET else check_kind(checksum)
                opts = self._compression(compression, compression_level)
                self._raise_unreported()
                plan = scope.plan(obj, per_rank, shard_size or self.shard_size,
                                  None if opts is None else codec.MIN_COMPRESS_BYTES)
                if metadata is not None and not isinstance(metadata, Mapping):
                    raise TypeError(f"metadata must be a mapping, not {type(metadata).__name__}")
                meta_tree = flatten(dict(metadata or {}))
                if meta_tree.tensors:
                    raise CheckpointError("metadata must not contain tensors")
                commit.check_replaceable(path)
                tmp, futures = self._stage_bounded(scope, plan, path, kind, opts)
            except BaseException as e:
                # Every save takes part in its commit round, so that ranks stay in step
                # even when only some of them fail here.
                self._committer.submit(scope.abandon, e)
                raise
            stall = time.perf_counter() - t0
            fut = self._committer.submit(
                self._finish, scope, plan, futures, tmp, path, kind, meta_tree.tree, t0, stall
            )
            handle = SaveHandle(fut, path, stall)
            self._handles = [h for h in self._handles if not h.done() or not h.reported]
            self._handles.append(handle)
            return handle

    def write(self, plan: Plan, directory: str, *, checksum: str | None = _UNSET,
              compression: str | None = _UNSET, compression_level: int | None = None,
              stream: bool = False) -> list[cf.Future[ShardResult]]:
        """Stage ``plan``'s tensors and write its shards into ``directory`` on the
        background writers, returning once staged (one future per shard).
        ``stream=True`` starts writing while staging, for a caller that waits for the
        writes anyway (otherwise writes start after staging when the state fits the
        staging budget, to keep the caller's copy fast).

        For a caller that coordinates its own commit (the storage plugin of
        ``torch.distributed.checkpoint``): nothing is committed here.
        """
        kind = self.checksum if checksum is _UNSET else check_kind(checksum)
        opts = self._compression(compression, compression_level)
        with self._lock:
            self._check_open()
            return self._stage(plan, directory, kind, opts, stream=stream)

    def _scope(self, group: Any, per_rank: Any) -> Any:
        """Who takes part in a save: this process alone, or the ranks of a group."""
        if group is None:
            group = dist.default_group()
        if (group is None or group is False) and per_rank is None:
            return self._local
        key = None if group is False else group
        if key not in self._scopes:
            self._scopes[key] = dist.Coordinator(key, self.collective_timeout, self._remove_later)
        return self._scopes[key]

    def _compression(self, name: Any, level: int | None) -> Compression | None:
        """The encoding of a save's compressed tensors (None: compress nothing), from
        its options or else this engine's."""
        spec = _check_compression(self.compression if name is _UNSET else name,
                                  self.compression_level if level is None else level)
        return None if spec is None else Compression(spec[0], self._encoders, spec[1])

    def _stage_bounded(self, scope: Any, plan: Plan, path: str, kind: str | None,
                       opts: Compression | None) -> tuple[str, list]:
        self._slots.acquire()
        try:
            tmp = scope.make_tmp(path)
        except BaseException:
            self._slots.release()
            raise
        try:
            return tmp, self._stage(plan, tmp, kind, opts)
        except BaseException:
            scope.discard(tmp)
            self._slots.release()
            raise

    def _stage(self, plan: Plan, tmp: str, kind: str | None, opts: Compression | None,
               stream: bool = False) -> list:
        # When the whole state fits in the staging budget, writers start only once
        # staging is done: they would otherwise compete with the caller's copies for
        # CPU and memory bandwidth, lengthening the stall. A larger state must stream,
        # and so does a caller that waits for the writes anyway (``stream``).
        fits = self._pool.fits(plan.shards)
        defer = not stream and fits
        # O_DIRECT holds each buffer until its bytes are on the disk, not merely in the
        # page cache. Not for a larger state staged while the caller waits: its staging
        # would wait for the disk instead of for a copy into the page cache. A caller
        # that streams waits for the writes anyway.
        direct = self.direct_io and (fits or stream)
        futures: list[cf.Future[ShardResult]] = []
        queues: list[queue.Queue] = []
        held: list[list] = []
        try:
            for shard in plan.shards:
                q: queue.Queue = queue.Queue()
                queues.append(q)
                futures.append(
                    self._writers.submit(
                        write_shard, shard, tmp, q, self._pool, kind, self._hashers, opts,
                        direct,
                    )
                )
                held.append([])
                self._stager.stage_shard(shard, held[-1].append if defer else q.put)
                if not defer:
                    q.put(None)
            self._stager.synchronize()
            if defer:
                for q, blocks in zip(queues, held, strict=True):
                    while blocks:  # a block handed over is no longer ours to release
                        q.put(blocks.pop(0))
                    q.put(None)
        except BaseException:
            self._abort(queues, held, futures, defer)
            raise
        return futures

    def _abort(self, queues: list, held: list, futures: list, defer: bool) -> None:
        for b in (b for blocks in held for b in blocks):
            self._pool.release(b.buf)
        for q in queues[-1:] if not defer else queues:
            q.put(None)
        cf.wait(futures)

    def _finish(self, scope: Any, plan: Plan, futures: list, tmp: str, path: str,
                kind: str | None, meta_tree: Any, t0: float, stall: float) -> SaveResult:
        try:
            cf.wait(futures)  # every writer done before the directory may be removed
            nbytes, shards, tensors = scope.commit(plan, futures, tmp, path, kind, meta_tree)
        finally:
            self._slots.release()
        total = time.perf_counter() - t0
        return SaveResult(path, nbytes, stall, total, shards, tensors)

    def _raise_unreported(self) -> None:
        for h in self._handles:
            if h.done() and not h.reported and h._future.exception() is not None:
                h.reported = True
                raise h._future.exception()

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this Checkpointer is closed")

    # -- loading ------------------------------------------------------------------

    def load(self, path: PathLike, map_location: Any = "cpu", mmap: bool = True,
             verify: bool = False) -> Any:
        """Load a checkpoint; see :func:`fastckpt.load`."""
        return reader.load(path, map_location=map_location, mmap=mmap, verify=verify)

    def verify(self, path: PathLike) -> reader.VerifyReport:
        """Check every checksum of a checkpoint; see :func:`fastckpt.verify`."""
        return reader.verify(path, workers=self.workers)

    # -- lifecycle ----------------------------------------------------------------

    def _remove_later(self, replaced: str) -> None:
        """Queue the removal of a checkpoint that a committed save replaced."""
        self._removals = [f for f in self._removals if not f.done()]
        self._removals.append(self._remover.submit(_remove_replaced, replaced))

    def wait_all(self, timeout: float | None = None) -> None:
        """Wait for every save in flight, and for the removal of the checkpoints they
        replaced (failures are not raised here)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        cf.wait([h._future for h in self._handles], timeout=timeout)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        cf.wait(self._removals, timeout=left)

    def close(self) -> None:
        """Wait for in-flight saves and the removal of the checkpoints they replaced,
        stop the threads, free the staging buffers."""
        with self._lock:  # a save() staging on another thread finishes handing off
            if self._closed:
                return
            self._closed = True
        self._committer.shutdown(wait=True)
        self._remover.shutdown()
        self._writers.shutdown(wait=True)
        self._hashers.shutdown()
        self._encoders.shutdown()
        self._pool.clear()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Local:
    """The scope of a save by this process alone: plan everything, write into a
    private temporary sibling, commit it.

    A scope decides who takes part in a save. The engine calls, on the caller's
    thread, ``start()``, ``plan()``, ``make_tmp()`` (and ``discard(tmp)`` if staging
    fails), then on the committer thread either ``commit()`` once the writers are
    done, or ``abandon(error)`` for a save that failed before it got under way.
    ``fastckpt.dist.Coordinator`` is the scope of saves made by several ranks.
    ``dispose`` takes the directory of a checkpoint that a commit replaced.
    """

    def __init__(self, dispose: Callable[[str], Any]) -> None:
        self.dispose = dispose

    def start(self) -> None:
        """Nothing to count: a local save needs no commit round."""

    def plan(self, obj: Any, per_rank: Any, shard_size: int, compress_min: int | None) -> Plan:
        return make_plan(flatten(obj), shard_size, compress_min)

    def make_tmp(self, path: str) -> str:
        tmp = commit.sibling(path, commit.TMP_TAG)
        try:
            commit.recover(path)
            os.mkdir(tmp, 0o755)
        except OSError as e:
            raise CheckpointWriteError(f"cannot create {tmp}: {e}") from e
        return tmp

    def discard(self, tmp: str) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def abandon(self, error: BaseException) -> None:
        """Nothing to tell anyone when a save fails before it is under way."""

    def commit(self, plan: Plan, futures: list, tmp: str, path: str, kind: str | None,
               meta_tree: Any) -> tuple[int, int, int]:
        """Write the manifest and move ``tmp`` into place; (bytes, shards, tensors)."""
        try:
            results = [f.result() for f in futures]
            commit.commit(tmp, path, _manifest(plan, results, kind, meta_tree),
                          self.dispose)
        except CheckpointError:
            self.discard(tmp)
            raise
        except OSError as e:
            self.discard(tmp)
            raise CheckpointWriteError(f"committing {path} failed: {e}") from e
        return plan.nbytes, len(plan.shards), len(plan.stored)


def _remove_replaced(path: str) -> None:
    try:
        # The manifest first: whatever is left is then no checkpoint to anyone.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, mf.MANIFEST_NAME))
        shutil.rmtree(path)
    except Exception as e:  # noqa: BLE001 - nobody waits for this result: log it
        # The new checkpoint is committed; commit.recover() removes this leftover once
        # this process is gone.
        log.warning("could not remove the replaced checkpoint %s: %s", path, e)


# Engines not closed by their owner: a replaced checkpoint still being removed when
# the program exits would otherwise stay behind as a hidden copy.
_engines: weakref.WeakSet[Checkpointer] = weakref.WeakSet()


@atexit.register
def _finish_removals() -> None:
    for engine in list(_engines):
        cf.wait(engine._removals)


def _manifest(plan: Plan, results: list[ShardResult], kind: str | None, meta_tree: Any) -> dict:
    written: dict[str, dict] = {}
    for r in results:
        written.update(r.tensors)
    shards = [{"file": r.file, "size": r.size, "checksum": r.checksum} for r in results]
    tensors = {s.name: manifest_tensor(s, written[s.name]) for s in plan.stored}
    return mf.document(kind, shards, tensors, plan.refs, plan.flat.tree, meta_tree)


COMPRESSIONS = ("zstd", "auto")


def _check_compression(name: str | None, level: int | None) -> tuple[int, bool] | None:
    """The zstd level and whether to adapt to the disk, or None for no compression."""
    if name is None:
        return None
    if name not in COMPRESSIONS:
        raise ValueError(f"unknown compression {name!r}; choose one of {COMPRESSIONS} or None")
    return (codec.DEFAULT_LEVEL if level is None else level), name == "auto"
