"""Positional file I/O into and out of buffers, for moving tensor bytes.

Every function takes a raw file descriptor and any C-contiguous buffer-protocol
object (bytearray, memoryview, numpy array, ``tensor.numpy()``, mmap). The work is
done by the optional C++ extension ``fastckpt._native`` when it was built, and by
the pure-Python code below otherwise; both have the same semantics, raise the same
exception types and produce identical bytes. Setting ``FASTCKPT_NO_NATIVE`` to a
non-empty value other than ``"0"`` forces the Python path (checked on every call).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import mmap
import operator
import os
import stat
import threading
from collections.abc import Callable, Iterator

import numpy as np

try:
    from . import _native
except ImportError:  # built without a compiler: the Python paths below take over
    _native = None

#: Alignment of offsets, lengths and addresses for O_DIRECT I/O.
DIRECT_ALIGN = 4096
# Below this a chunk is not worth a thread (same constant as the extension).
_MIN_CHUNK = 4 << 20
_MAX_THREADS = 64
_BOUNCE = 16 << 20
# The transparent huge page size on x86-64 and most arm64 kernels.
HUGE_PAGE = 2 << 20
# Below this a copy is over before releasing the GIL would pay for itself.
_GIL_FREE_COPY = 64 << 10
_OFF_MIN, _OFF_MAX = -(2**63), 2**63 - 1

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()

_SYNC_FILE_RANGE_WAIT_BEFORE, _SYNC_FILE_RANGE_WRITE, _SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4
_sync_file_range = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def native_available() -> bool:
    """True when the extension is built and ``FASTCKPT_NO_NATIVE`` does not disable it."""
    return _native is not None and os.environ.get("FASTCKPT_NO_NATIVE", "") in ("", "0")


def native():
    """The extension module while :func:`native_available`, else None (for the codec's
    kernels, which live beside the I/O in the same extension)."""
    return _native if native_available() else None


def pread_into(fd: int, offset: int, buf, threads: int = 1) -> None:
    """Fill all of the writable buffer ``buf`` with the file's bytes at ``offset``.

    The range is split into large chunks read by up to ``threads`` threads without
    the GIL; short reads are retried. Raises ``EOFError`` (before touching ``buf``)
    when the file is too short, ``OSError`` on I/O errors, ``ValueError`` for a
    negative offset or thread count and ``TypeError`` for a read-only or
    non-contiguous buffer.
    """
    if native_available():
        _native.pread_into(fd, offset, buf, threads)
        return
    with _flat(buf, writable=True) as flat:
        offset = _check_range(offset, flat.nbytes)
        threads = _check_threads(threads)
        _check_eof("pread_into", fd, offset, flat.nbytes)

        def read_chunk(start: int, end: int) -> None:
            if not _read_full(fd, flat[start:end], offset + start):
                raise _eof_error("pread_into", fd, offset, flat.nbytes)

        _run_parallel(read_chunk, _chunks(flat.nbytes, threads))


def pwrite_all(fd: int, offset: int, buf, threads: int = 1) -> None:
    """Write all of ``buf`` at ``offset``, in up to ``threads`` parallel chunks.

    Short writes are retried; errors raise ``OSError`` with the errno.
    """
    if native_available():
        _native.pwrite_all(fd, offset, buf, threads)
        return
    with _flat(buf, writable=False) as flat:
        offset = _check_range(offset, flat.nbytes)
        threads = _check_threads(threads)
        _run_parallel(
            lambda start, end: _write_full(fd, flat[start:end], offset + start),
            _chunks(flat.nbytes, threads),
        )


def start_writeback(fd: int, offset: int = 0, nbytes: int = 0) -> None:
    """Start writing the file's dirty pages to the disk now, without waiting: those of
    ``[offset, offset + nbytes)``, or from ``offset`` to the end when ``nbytes`` is 0.

    Left alone, the kernel holds gigabytes of dirty pages before it writes any, so the
    disk idles while a checkpoint is produced and the final ``fsync`` pays for all of
    it; started as data arrives, the writing overlaps the producing. Advisory: a
    no-op where the OS lacks ``sync_file_range``, and errors are left for that
    ``fsync`` to report.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def wait_writeback(fd: int, end: int) -> None:
    """Write the file's first ``end`` bytes to the disk and wait until they are written
    (not a durability point: no metadata, no disk cache flush), so that a producer
    can keep pace with the disk. A no-op where the OS lacks ``sync_file_range``."""
    if _sync_file_range is not None and end > 0:
        _sync_file_range(fd, 0, end, _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE
                         | _SYNC_FILE_RANGE_WAIT_AFTER)


def prefault(buf, threads: int = 2) -> None:
    """Read one byte in every page of ``buf`` so its page faults happen now, in parallel.

    Meant for freshly mapped files; the contents are never modified.
    """
    if native_available():
        _native.prefault(buf, threads)
        return
    with _flat(buf, writable=False) as flat:
        threads = _check_threads(threads)
        _touch_pages(flat, threads)


def open_direct(path: str, write: bool = False) -> int | None:
    """Open ``path`` for O_DIRECT I/O: read-only, or read-write and created if missing.

    Returns the descriptor, or ``None`` when the platform or filesystem refuses
    O_DIRECT (EINVAL on open or on a probe read), so the caller can fall back to
    buffered I/O. Other errors raise ``OSError``.
    """
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return None
    mode = os.O_RDWR | os.O_CREAT if write else os.O_RDONLY
    try:
        fd = os.open(path, mode | direct | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise
    # Some filesystems accept the flag at open and only fail the first read.
    try:
        os.preadv(fd, [mmap.mmap(-1, DIRECT_ALIGN)], 0)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EINVAL:
            return None
        raise
    return fd


def direct_io_supported(directory: str) -> bool:
    """Whether the filesystem holding ``directory`` takes O_DIRECT I/O, probed with a
    scratch file that is removed again."""
    probe = os.path.join(directory, f".fastckpt-direct-probe-{os.getpid()}-{threading.get_ident()}")
    try:
        fd = open_direct(probe, write=True)
        if fd is not None:
            os.close(fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(probe)
    return fd is not None


def pread_direct_into(fd: int, offset: int, buf) -> None:
    """Fill ``buf`` from an :func:`open_direct` descriptor at ``offset``.

    Offset, length and ``buf`` need no alignment: whole aligned blocks are read into
    an aligned bounce buffer and the wanted bytes copied out (fully aligned requests
    are read in place by the extension). Errors as in :func:`pread_into`.
    """
    if native_available():
        _native.pread_direct_into(fd, offset, buf)
        return
    with _flat(buf, writable=True) as flat:
        offset = _check_range(offset, flat.nbytes)
        _check_eof("pread_direct_into", fd, offset, flat.nbytes)
        if flat.nbytes:
            _direct_read(fd, offset, flat)


def io_buffer(nbytes: int) -> memoryview:
    """``nbytes`` of zeroed anonymous memory, page-aligned, for direct I/O.

    Backed by transparent huge pages where the kernel grants them (the ``madvise``
    setting included). An O_DIRECT request is built from the physical pages of its
    buffer; scattered 4 KiB pages cap each device request at a few hundred KiB,
    where 2 MiB pages let it reach the device's maximum. On a disk that pays per
    request, that is up to a 4x faster write from the same bytes. The memory is
    returned to the system when the last view of it is dropped."""
    private = mmap.MAP_PRIVATE  # shared anonymous memory is shmem, not eligible
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return memoryview(mmap.mmap(-1, max(nbytes, 1), flags=private))[:nbytes]
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=private)
    skip = -_address(region) % HUGE_PAGE
    with contextlib.suppress(OSError):  # no huge pages here: ordinary pages do
        region.madvise(mmap.MADV_HUGEPAGE, skip, nbytes - nbytes % HUGE_PAGE)
    return memoryview(region)[skip : skip + nbytes]


def copy_into(dst: memoryview, src: memoryview) -> None:
    """``dst[:] = src`` for byte views of one length. A large copy runs with the GIL
    released (numpy's does; a memoryview assignment holds it): copies on background
    threads then leave the other threads free to issue I/O and hash meanwhile."""
    if len(src) < _GIL_FREE_COPY:
        dst[:] = src
    else:
        np.copyto(np.frombuffer(dst, dtype=np.uint8), np.frombuffer(src, dtype=np.uint8))


def aligned(buf) -> bool:
    """Whether the (non-empty) buffer starts on a :data:`DIRECT_ALIGN` boundary, so
    that O_DIRECT reads or writes it in place."""
    return _address(buf) % DIRECT_ALIGN == 0


def _address(buf) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


def pwrite_direct(fd: int, offset: int, buf) -> None:
    """Write ``buf`` at the aligned ``offset`` of an :func:`open_direct` descriptor.

    The whole aligned blocks go through O_DIRECT; a final partial block is written
    through a second, buffered descriptor for the same file (via /proc/self/fd).
    Raises ``ValueError`` if ``offset`` is not a multiple of :data:`DIRECT_ALIGN`.
    """
    if native_available():
        _native.pwrite_direct(fd, offset, buf)
        return
    with _flat(buf, writable=False) as flat:
        offset = _check_range(offset, flat.nbytes)
        if offset % DIRECT_ALIGN:
            raise ValueError(
                f"pwrite_direct needs an offset aligned to {DIRECT_ALIGN}, got {offset}"
            )
        body = flat.nbytes - flat.nbytes % DIRECT_ALIGN
        _direct_write(fd, offset, flat[:body])
        if body < flat.nbytes:
            twin = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                _write_full(twin, flat[body:], offset + body)
            finally:
                os.close(twin)


# --- pure-Python implementation -------------------------------------------------------


@contextlib.contextmanager
def _flat(buf, writable: bool) -> Iterator[memoryview]:
    """A flat byte view of ``buf``, released on exit so a caller's mmap can close."""
    with memoryview(buf) as view:
        if not view.c_contiguous:
            raise TypeError("buffer must be C-contiguous")
        if writable and view.readonly:
            raise TypeError("buffer must be writable")
        with view.cast("B") as flat:
            yield flat


def _check_range(offset: int, length: int) -> int:
    offset = operator.index(offset)
    if not _OFF_MIN <= offset <= _OFF_MAX:
        raise OverflowError(f"offset {offset} does not fit a file offset")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if offset > _OFF_MAX - length:
        raise OverflowError("offset + buffer length overflows a file offset")
    return offset


def _check_threads(threads: int) -> int:
    threads = operator.index(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return threads


def _eof_error(fn: str, fd: int, offset: int, length: int) -> EOFError:
    size = os.fstat(fd).st_size
    return EOFError(f"{fn} wants bytes [{offset}, {offset + length}) but the file has {size} bytes")


def _check_eof(fn: str, fd: int, offset: int, length: int) -> None:
    # Only regular files report a meaningful size; other kinds fail in the read.
    st = os.fstat(fd)
    if length and stat.S_ISREG(st.st_mode) and offset + length > st.st_size:
        raise _eof_error(fn, fd, offset, length)


def _chunks(length: int, threads: int) -> list[tuple[int, int]]:
    """Page-aligned [start, end) slices of [0, length), at most one per thread."""
    n = max(1, min(threads, _MAX_THREADS, length // _MIN_CHUNK))
    per = _round_up(-(-length // n), DIRECT_ALIGN) or DIRECT_ALIGN
    return [(start, min(length, start + per)) for start in range(0, length, per)]


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                _MAX_THREADS - 1, thread_name_prefix="fastckpt-io"
            )
        return _pool


def _run_parallel(fn: Callable[[int, int], None], ranges: list[tuple[int, int]]) -> None:
    """Run ``fn(start, end)`` over ``ranges``, the first in this thread.

    Waits for every chunk before raising the first error, so that no worker still
    writes into the caller's buffer after the call returns.
    """
    if not ranges:
        return
    futures = [_executor().submit(fn, *r) for r in ranges[1:]]
    try:
        fn(*ranges[0])
    finally:
        concurrent.futures.wait(futures)
    for future in futures:
        future.result()


def _read_full(fd: int, view: memoryview, pos: int) -> bool:
    """Fill ``view`` from ``pos``; False if the file ends first."""
    while view:
        n = os.preadv(fd, [view], pos)
        if n == 0:
            return False
        view, pos = view[n:], pos + n
    return True


def _write_full(fd: int, view: memoryview, pos: int) -> None:
    while view:
        n = os.pwrite(fd, view, pos)
        if n == 0:  # would loop forever; only a dead device does this
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        view, pos = view[n:], pos + n


def _read_blocks(fd: int, view: memoryview, pos: int) -> int:
    """Read aligned blocks into ``view``; stops early at the file's (unaligned) end."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], pos + got)
        got += n
        if n == 0 or got % DIRECT_ALIGN:
            break
    return got


def _direct_read(fd: int, offset: int, flat: memoryview) -> None:
    length = flat.nbytes
    cap = min(_BOUNCE, _round_up(offset % DIRECT_ALIGN + length, DIRECT_ALIGN))
    # Anonymous mappings are page-aligned, as O_DIRECT requires of the memory.
    staging = memoryview(mmap.mmap(-1, cap))
    done = 0
    while done < length:
        pos = offset + done
        skip = pos % DIRECT_ALIGN
        want = min(cap, _round_up(skip + length - done, DIRECT_ALIGN))
        got = _read_blocks(fd, staging[:want], pos - skip)
        if got <= skip:
            raise _eof_error("pread_direct_into", fd, offset, length)
        n = min(got - skip, length - done)
        flat[done : done + n] = staging[skip : skip + n]
        done += n


def _direct_write(fd: int, offset: int, body: memoryview) -> None:
    if not body:
        return
    if aligned(body):
        _write_full(fd, body, offset)  # aligned memory goes to the disk as it is
        return
    staging = memoryview(mmap.mmap(-1, min(_BOUNCE, body.nbytes)))
    for done in range(0, body.nbytes, _BOUNCE):
        n = min(_BOUNCE, body.nbytes - done)
        staging[:n] = body[done : done + n]
        _write_full(fd, staging[:n], offset + done)


def _touch_pages(flat: memoryview, threads: int) -> None:
    # A strided numpy read faults the pages in; madvise(MADV_WILLNEED) would only
    # start readahead and leave every page to fault again on first access.
    if not flat.nbytes:
        return
    pages = np.frombuffer(flat, dtype=np.uint8)
    page = mmap.PAGESIZE
    base = pages.ctypes.data

    def touch(start: int, end: int) -> None:
        first = start + (-(base + start) % page)
        pages[first:end:page].max(initial=pages[start])

    _run_parallel(touch, _chunks(flat.nbytes, threads))
