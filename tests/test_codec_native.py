"""The extension's codec kernels: byte grouping identical to the numpy fallback, and
Huffman-only frames that stock zstd decodes to the exact input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from fastckpt import codec, fileio

native = fileio._native
pytestmark = pytest.mark.skipif(native is None, reason="fastckpt._native is not built")


def skewed_bytes(n: int, symbols: int, seed: int, concentration: float = 1.0) -> np.ndarray:
    """``n`` independent draws from a random distribution over ``symbols`` values."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(symbols, concentration))
    return rng.choice(symbols, size=n, p=p).astype(np.uint8)


def decompress(frame: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(frame)


@pytest.mark.parametrize("itemsize", [2, 4, 8])
@pytest.mark.parametrize("count", [0, 1, 3, 1000, 262_147])
def test_split_and_merge_match_the_fallback(monkeypatch, itemsize, count):
    raw = np.random.default_rng(count).integers(0, 256, count * itemsize, dtype=np.uint8)
    monkeypatch.setenv("FASTCKPT_NO_NATIVE", "1")
    want = [g.copy() for g in codec._split_groups(memoryview(raw), itemsize)]
    monkeypatch.delenv("FASTCKPT_NO_NATIVE")
    got = np.empty_like(raw)
    native.split_groups(raw, itemsize, got)
    assert got.tobytes() == b"".join(g.tobytes() for g in want)
    back = bytearray(len(raw))
    native.merge_groups([g.tobytes() for g in want], itemsize, back)
    assert bytes(back) == raw.tobytes()


def test_grouping_rejects_bad_arguments():
    buf = bytearray(16)
    with pytest.raises(ValueError, match="itemsize"):
        native.split_groups(buf, 3, bytearray(16))
    with pytest.raises(ValueError, match="whole"):
        native.split_groups(bytearray(6), 4, bytearray(6))
    with pytest.raises(ValueError, match="dst holds"):
        native.split_groups(buf, 2, bytearray(8))
    with pytest.raises(TypeError, match="writable"):
        native.split_groups(buf, 2, bytes(16))
    with pytest.raises(ValueError, match="need 2 groups"):
        native.merge_groups([bytes(8)], 2, buf)
    with pytest.raises(ValueError, match="group 1 holds"):
        native.merge_groups([bytes(8), bytes(7)], 2, buf)


@pytest.mark.parametrize(
    "n,symbols,concentration",
    [
        (1024, 2, 1.0),  # the smallest input coded
        (5000, 129, 0.05),  # the largest alphabet, very skewed
        (100_000, 25, 1.0),
        (128 << 10, 12, 0.3),  # exactly one block
        ((128 << 10) + 1, 40, 1.0),  # just over: two balanced blocks
        ((1 << 20) + 7, 70, 5.0),  # nearly flat over 70 values
    ],
)
def test_frames_decode_to_the_input_with_stock_zstd(n, symbols, concentration):
    for seed in range(5):
        data = skewed_bytes(n, symbols, seed, concentration)
        frame = native.huffman_frame(data)
        if frame is None:  # allowed only when coding would not shrink the data
            assert concentration >= 5.0
            continue
        assert len(frame) < n
        assert decompress(frame) == data.tobytes()
        params = zstandard.get_frame_parameters(frame)
        assert params.content_size == n and params.has_checksum
        assert frame[-4:] == xxhash.xxh64_intdigest(data.tobytes()).to_bytes(8, "little")[:4]


def test_frames_come_close_to_the_entropy():
    data = skewed_bytes(1 << 20, 30, seed=3)
    p = np.bincount(data, minlength=30) / len(data)
    entropy_bytes = -(p[p > 0] * np.log2(p[p > 0])).sum() * len(data) / 8
    frame = native.huffman_frame(data)
    assert entropy_bytes <= len(frame) < 1.03 * entropy_bytes + 200


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1024, 300_000),
    symbols=st.integers(2, 129),
    concentration=st.sampled_from([0.02, 0.2, 1.0, 10.0]),
    runs=st.booleans(),
)
def test_any_skewed_input_round_trips_or_is_refused(seed, n, symbols, concentration, runs):
    data = skewed_bytes(n, symbols, seed, concentration)
    if runs:  # long runs of one value, as in sparse tensors
        data[: n // 2] = data[0]
    frame = native.huffman_frame(data)
    if frame is not None:
        assert len(frame) < n and decompress(frame) == data.tobytes()


def test_rare_symbols_get_codes_within_the_length_limit():
    # Counts like 1, 2, 4, 8, ... would need codes far longer than zstd's 11 bits.
    data = np.repeat(np.arange(20, dtype=np.uint8), [1 << k for k in range(20)])
    np.random.default_rng(0).shuffle(data)
    assert decompress(native.huffman_frame(data)) == data.tobytes()


@pytest.mark.parametrize(
    "data",
    [
        np.zeros(4096, np.uint8),  # one value: no Huffman code exists
        np.arange(4096, dtype=np.uint16).astype(np.uint8) | 0x80,  # values above 128
        skewed_bytes(1023, 10, seed=0),  # too small
        np.random.default_rng(0).integers(0, 129, 1 << 16, dtype=np.uint8),  # ~7 bits each
    ],
    ids=["one-value", "above-128", "tiny", "nearly-flat"],
)
def test_frames_refused_where_they_cannot_help(data):
    frame = native.huffman_frame(data)
    assert frame is None or (len(frame) < len(data) and decompress(frame) == data.tobytes())
    if data.max() > 128 or len(np.unique(data)) < 2 or len(data) < 1024:
        assert frame is None


def test_native_and_fallback_payloads_decode_alike(monkeypatch):
    raw = (torch.randn(700_000) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    fast_pieces, fast_meta = codec.encode(memoryview(raw), 2, True)
    monkeypatch.setenv("FASTCKPT_NO_NATIVE", "1")
    slow_pieces, slow_meta = codec.encode(memoryview(raw), 2, True)
    fast, slow = (b"".join(bytes(p) for p in ps) for ps in (fast_pieces, slow_pieces))
    assert fast != slow  # different, equally valid frames
    assert abs(len(fast) - len(slow)) < 0.01 * len(raw)
    for impl in ("fallback", "native"):  # each decoder reads both encoders' payloads
        for payload, meta in ((fast, fast_meta), (slow, slow_meta)):
            out = bytearray(len(raw))
            codec.decode_into(memoryview(payload), meta, memoryview(out), key="w")
            assert bytes(out) == raw, impl
        monkeypatch.delenv("FASTCKPT_NO_NATIVE", raising=False)


def test_repetitive_exponents_keep_zstd():
    # 99 % zeros: Huffman alone cannot go below 1 bit a byte (n / 8), zstd's matches can.
    group = np.zeros(1 << 19, np.uint8)
    group[::100] = skewed_bytes(len(group[::100]), 30, seed=1)
    assert native.huffman_frame(group) is not None  # the Huffman coder would take it
    mode, frame = codec._compress_skewed(group, codec.DEFAULT_LEVEL)
    assert mode == "zstd" and len(frame) < len(group) / 16
    assert decompress(frame) == group.tobytes()
    t = torch.zeros(1 << 19)  # and through the whole encoder, on a sparse tensor
    t[::100] = torch.randn(len(t[::100]))
    raw = t.view(torch.uint8).numpy().tobytes()
    pieces, meta = codec.encode(memoryview(raw), 4, True)
    assert sum(len(p) for p in pieces) < len(raw) / 20
