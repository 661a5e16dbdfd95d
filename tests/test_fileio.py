"""fastckpt.fileio: every test runs against the native extension and the Python fallback."""

from __future__ import annotations

import errno
import mmap
import os

import numpy as np
import pytest
from conftest import huge_page_eligible

from fastckpt import fileio

MiB = 1 << 20


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    data = np.random.default_rng(0).integers(0, 256, 64 * MiB, dtype=np.uint8).tobytes()
    path = tmp_path_factory.mktemp("fileio") / "big.bin"
    path.write_bytes(data)
    return path, data


@pytest.fixture
def rfd(big_file):
    fd = os.open(big_file[0], os.O_RDONLY)
    yield fd
    os.close(fd)


def small_file(tmp_path, size=10_000):
    data = os.urandom(size)
    path = tmp_path / "small.bin"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("value, enabled", [("", True), ("0", True), ("1", False), ("yes", False)])
def test_env_var_is_read_on_every_call(monkeypatch, value, enabled):
    monkeypatch.setenv("FASTCKPT_NO_NATIVE", value)
    assert fileio.native_available() == (enabled and fileio._native is not None)


def test_round_trip_at_odd_offsets(impl, tmp_path):
    rng = np.random.default_rng(1)
    fd = os.open(tmp_path / "rt.bin", os.O_RDWR | os.O_CREAT)
    try:
        for offset, length in [(0, 1), (1, 4095), (4097, 12_345), (3, 5 * MiB + 7), (999, 0)]:
            data = rng.integers(0, 256, length, dtype=np.uint8)
            fileio.pwrite_all(fd, offset, data, threads=3)
            out = bytearray(length)
            fileio.pread_into(fd, offset, out, threads=3)
            assert out == data.tobytes()
            assert os.pread(fd, length, offset) == data.tobytes()
    finally:
        os.close(fd)


def test_reads_into_every_kind_of_buffer(impl, rfd, big_file):
    data = big_file[1]
    arr = np.zeros((3, 1001), dtype=np.float32)
    fileio.pread_into(rfd, 11, arr)
    assert arr.tobytes() == data[11 : 11 + arr.nbytes]
    raw = bytearray(20_000)
    fileio.pread_into(rfd, 5, memoryview(raw)[7:9007])
    assert raw[7:9007] == data[5:9005] and raw[:7] == bytes(7) and raw[9007:] == bytes(10_993)
    with mmap.mmap(-1, 3 * 4096) as mm:
        fileio.pread_into(rfd, 4096 + 1, mm, threads=2)
        assert mm[:] == data[4097 : 4097 + 3 * 4096]


def test_reads_into_a_tensor_view(impl, rfd, big_file):
    torch = pytest.importorskip("torch")
    tensor = torch.empty(1000, 7, dtype=torch.int16)
    fileio.pread_into(rfd, 77, tensor.numpy())
    assert tensor.numpy().tobytes() == big_file[1][77 : 77 + 14_000]


@pytest.mark.parametrize("threads", [1, 2, 4, 7])
def test_multithreaded_read_of_64_mib(impl, rfd, big_file, threads):
    out = np.empty(64 * MiB, dtype=np.uint8)
    fileio.pread_into(rfd, 0, out, threads=threads)
    assert out.tobytes() == big_file[1]


def test_multithreaded_write(impl, tmp_path, big_file):
    data = big_file[1][: 24 * MiB + 5]
    fd = os.open(tmp_path / "w.bin", os.O_WRONLY | os.O_CREAT)
    try:
        fileio.pwrite_all(fd, 3, data, threads=4)
    finally:
        os.close(fd)
    assert (tmp_path / "w.bin").read_bytes() == bytes(3) + data


def test_read_past_eof_raises_and_leaves_buffer_alone(impl, tmp_path):
    path, data = small_file(tmp_path)
    out = bytearray(b"\xab" * 200)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(EOFError, match=r"wants bytes \[9900, 10100\) but the file has 10000"):
            fileio.pread_into(fd, 9900, out, threads=2)
        assert out == b"\xab" * 200
        with pytest.raises(EOFError):
            fileio.pread_into(fd, 1 << 40, bytearray(1))
        fileio.pread_into(fd, 1 << 40, bytearray(0))  # an empty read succeeds anywhere
        fileio.pread_into(fd, 9800, out)
        assert out == data[9800:]
    finally:
        os.close(fd)


def test_mmap_can_close_after_calls(impl, tmp_path):
    path, _ = small_file(tmp_path)
    fd = os.open(path, os.O_RDONLY)
    mm = mmap.mmap(-1, 20_000)
    try:
        fileio.pread_into(fd, 0, memoryview(mm)[:10_000])
        with pytest.raises(EOFError):
            fileio.pread_into(fd, 0, mm)
        fileio.prefault(mm)
    finally:
        os.close(fd)
    mm.close()  # raises BufferError if a view of it leaked


def test_invalid_fd_raises_oserror(impl, tmp_path):
    fd = os.open(tmp_path / "x.bin", os.O_RDWR | os.O_CREAT)
    os.close(fd)
    with pytest.raises(OSError) as info:
        fileio.pread_into(fd, 0, bytearray(10))
    assert info.value.errno == errno.EBADF
    with pytest.raises(OSError) as info:
        fileio.pwrite_all(fd, 0, b"abc")
    assert info.value.errno == errno.EBADF


@pytest.mark.parametrize(
    "make",
    [
        lambda: bytes(16),
        lambda: memoryview(bytearray(16)).toreadonly(),
        lambda: np.frombuffer(bytes(16), dtype=np.uint8),
    ],
    ids=["bytes", "readonly-memoryview", "readonly-ndarray"],
)
def test_read_into_readonly_buffer_raises(impl, rfd, make):
    with pytest.raises((TypeError, ValueError, BufferError)):
        fileio.pread_into(rfd, 0, make())


@pytest.mark.parametrize(
    "call, exc",
    [
        (lambda fd: fileio.pread_into(fd, -1, bytearray(4)), ValueError),
        (lambda fd: fileio.pwrite_all(fd, -5, b"x"), ValueError),
        (lambda fd: fileio.pread_direct_into(fd, -1, bytearray(4)), ValueError),
        (lambda fd: fileio.pread_into(fd, 0, bytearray(4), threads=0), ValueError),
        (lambda fd: fileio.prefault(bytearray(4), threads=-1), ValueError),
        (lambda fd: fileio.pread_into(fd, 2**63 - 2, bytearray(4)), OverflowError),
        (lambda fd: fileio.pread_into(fd, 2**64, bytearray(4)), OverflowError),
        (lambda fd: fileio.pread_into(fd, 0, np.zeros((4, 4))[:, ::2]), TypeError),
        (lambda fd: fileio.pread_into(fd, 0, 12), TypeError),
        (lambda fd: fileio.pread_into(fd, 1.5, bytearray(4)), TypeError),
    ],
)
def test_invalid_arguments_raise(impl, rfd, call, exc):
    with pytest.raises(exc):
        call(rfd)


def direct_fd(path):
    fd = fileio.open_direct(str(path))
    if fd is None:
        pytest.skip(f"the filesystem holding {path.parent} refuses O_DIRECT")
    return fd


@pytest.mark.parametrize(
    "offset, length, shift",
    [
        (0, 8192, 0),  # fully aligned: read in place
        (1, 100, 0),
        (4095, 4098, 3),
        (12_345, 3 * MiB + 1, 1),
        (4096, 20 * MiB, 0),  # more than one bounce buffer
        (64 * MiB - 5000, 5000, 0),  # tail at EOF
        (64 * MiB - 1, 1, 2),
    ],
)
def test_direct_read_equals_buffered_read(impl, big_file, offset, length, shift):
    fd = direct_fd(big_file[0])
    try:
        raw = bytearray(length + shift)
        fileio.pread_direct_into(fd, offset, memoryview(raw)[shift:])
        assert raw[shift:] == big_file[1][offset : offset + length]
        with pytest.raises(EOFError):
            fileio.pread_direct_into(fd, 64 * MiB - 10, bytearray(11))
        fileio.pread_direct_into(fd, 5, bytearray(0))
    finally:
        os.close(fd)


def test_direct_write_round_trip(impl, tmp_path, big_file):
    path = tmp_path / "direct.bin"
    fd = fileio.open_direct(str(path), write=True)
    if fd is None:
        pytest.skip(f"the filesystem holding {tmp_path} refuses O_DIRECT")
    data = big_file[1]
    try:
        fileio.pwrite_direct(fd, 0, memoryview(data)[1 : 3 * MiB + 4])  # unaligned source
        fileio.pwrite_direct(fd, 4 * MiB, data[: 2 * 4096])
        aligned = mmap.mmap(-1, 3 * 4096 + 5)  # page-aligned memory: written in place
        aligned[:] = data[-len(aligned):]
        fileio.pwrite_direct(fd, 7 * MiB, aligned)
        fileio.pwrite_direct(fd, 5 * MiB, data[7:10])  # tail only
        fileio.pwrite_direct(fd, 6 * MiB, b"")
        with pytest.raises(ValueError):
            fileio.pwrite_direct(fd, 100, b"x")
    finally:
        os.close(fd)
    written = path.read_bytes()
    assert written[: 3 * MiB + 3] == data[1 : 3 * MiB + 4]
    assert written[3 * MiB + 3 : 4 * MiB] == bytes(MiB - 3)
    assert written[4 * MiB : 4 * MiB + 2 * 4096] == data[: 2 * 4096]
    assert written[5 * MiB : 5 * MiB + 3] == data[7:10]
    assert written[7 * MiB :] == data[-(3 * 4096 + 5):]


@pytest.mark.parametrize("nbytes", [1, 5000, fileio.HUGE_PAGE, 3 * fileio.HUGE_PAGE + 4097])
def test_io_buffer_is_aligned_zeroed_and_writable(nbytes):
    buf = fileio.io_buffer(nbytes)
    assert len(buf) == nbytes and fileio.aligned(buf)
    assert not any(buf[:: 4096]) and not buf[-1]
    buf[:] = b"\xab" * nbytes
    assert bytes(buf) == b"\xab" * nbytes


def test_direct_io_probe_agrees_with_open_and_leaves_nothing(tmp_path):
    fd = fileio.open_direct(str(tmp_path / "f"), write=True)
    if fd is not None:
        os.close(fd)
    os.remove(tmp_path / "f")
    assert fileio.direct_io_supported(str(tmp_path)) == (fd is not None)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("nbytes", [0, 100, (64 << 10) - 1, 64 << 10, (3 << 20) + 5])
def test_copy_into_copies_every_byte(nbytes):
    """Small copies assign, large ones go through numpy (GIL released): same bytes."""
    src = memoryview(np.random.default_rng(nbytes).integers(0, 256, nbytes + 7, np.uint8))
    dst = fileio.io_buffer(nbytes + 9)
    fileio.copy_into(dst[2 : 2 + nbytes], src[7:])
    assert bytes(dst[2 : 2 + nbytes]) == bytes(src[7:])
    assert not any(dst[:2]) and not any(dst[2 + nbytes :])


def test_large_io_buffer_asks_for_huge_pages():
    """Direct writes from scattered 4 KiB pages reach the device in small requests:
    an I/O buffer of a huge page or more starts on a huge-page boundary and is
    marked for huge pages."""
    small, large = fileio.io_buffer(fileio.HUGE_PAGE - 4096), fileio.io_buffer(5 << 20)
    address = np.frombuffer(large, dtype=np.uint8).ctypes.data
    assert address % fileio.HUGE_PAGE == 0
    assert huge_page_eligible(address)
    assert not huge_page_eligible(np.frombuffer(small, dtype=np.uint8).ctypes.data)


@pytest.mark.parametrize("access", [mmap.ACCESS_READ, mmap.ACCESS_COPY, mmap.ACCESS_WRITE])
def test_prefault_leaves_bytes_unchanged(impl, tmp_path, big_file, access):
    path = tmp_path / "map.bin"
    data = big_file[1][: 9 * MiB + 123]
    path.write_bytes(data)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0, access=access) as mm:
        fileio.prefault(mm, threads=3)
        with memoryview(mm) as view:
            fileio.prefault(view[4095 : 5 * MiB + 1], threads=2)
        assert mm[:] == data
    assert path.read_bytes() == data
    fileio.prefault(b"")  # nothing to touch


def test_writeback_is_advisory(tmp_path):
    """Starting or waiting for writeback leaves the file's bytes as written, and never
    raises: even on a descriptor that is not a file, fsync is what reports errors."""
    data = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8)
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fileio.pwrite_all(fd, 0, data)
        fileio.start_writeback(fd)
        fileio.wait_writeback(fd, len(data) // 2)
        fileio.wait_writeback(fd, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == data.tobytes()
    r, w = os.pipe()
    try:
        fileio.start_writeback(r)
        fileio.wait_writeback(w, 1 << 20)
    finally:
        os.close(r)
        os.close(w)
