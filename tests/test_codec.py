"""Tests of the byte-grouped zstd codec: round trips, raw fallback, hostile input.

Every test runs twice: with the C++ extension's kernels and with the numpy/zstd
fallback (the ``impl`` fixture)."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastckpt import codec
from fastckpt.errors import CorruptCheckpointError

pytestmark = pytest.mark.usefixtures("impl")

FLOATS = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
OTHERS = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


def weights_like(numel: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Values shaped like trained weights (small normals), cast to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(numel, generator=gen) > 0.5
    if not dtype.is_floating_point:
        return torch.randint(-100, 100, (numel,), generator=gen).to(dtype)
    return (torch.randn(numel, generator=gen) * 0.02).to(dtype)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The tensor's raw bytes."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def round_trip(raw: bytes, itemsize: int, is_float: bool, executor=None) -> tuple[bytes, dict]:
    """Encode then decode ``raw``; returns (payload, meta) after checking bit-exactness."""
    pieces, meta = codec.encode(memoryview(raw), itemsize, is_float, executor=executor)
    payload = b"".join(bytes(p) for p in pieces)
    json.dumps(meta)
    out = bytearray(len(raw))
    codec.decode_into(memoryview(payload), meta, memoryview(out), key="t", executor=executor)
    assert bytes(out) == raw
    return payload, meta


def encoded(numel: int = 300_000, dtype: torch.dtype = torch.bfloat16) -> tuple[bytes, dict, int]:
    """A valid (payload, meta, raw length) of weight-like data with several chunks."""
    raw = tensor_bytes(weights_like(numel, dtype))
    pieces, meta = codec.encode(memoryview(raw), dtype.itemsize, dtype.is_floating_point)
    return b"".join(bytes(p) for p in pieces), meta, len(raw)


def decode(payload: bytes, meta, nbytes: int, key: str = "w") -> bytearray:
    """decode_into a fresh buffer of ``nbytes``."""
    out = bytearray(nbytes)
    codec.decode_into(memoryview(payload), meta, memoryview(out), key=key)
    return out


@pytest.mark.parametrize("dtype", FLOATS + OTHERS, ids=str)
@pytest.mark.parametrize("numel", [0, 1, 7, 40_001, 1_000_003])
def test_round_trip_bit_exact(dtype, numel):
    t = weights_like(numel, dtype)
    round_trip(tensor_bytes(t), t.element_size(), dtype.is_floating_point)


def test_special_float_values_round_trip():
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3.5])
    t = specials.repeat(20_000)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        round_trip(tensor_bytes(t.to(dtype)), dtype.itemsize, True)


def test_sizes_around_chunk_boundaries():
    for nbytes in (
        codec.CHUNK_BYTES - 2,
        codec.CHUNK_BYTES,
        codec.CHUNK_BYTES + 2,
        3 * codec.CHUNK_BYTES + 6,
    ):
        t = weights_like(nbytes // 2, torch.bfloat16)
        _, meta = round_trip(tensor_bytes(t), 2, True)
        assert sum(c["raw"] for c in meta["chunks"]) == nbytes


def test_parallel_encode_matches_serial():
    raw = tensor_bytes(weights_like(1_500_000, torch.float32))
    with ThreadPoolExecutor(2) as pool:
        payload_par, meta_par = round_trip(raw, 4, True, executor=pool)
    payload_ser, meta_ser = round_trip(raw, 4, True)
    assert payload_par == payload_ser and meta_par == meta_ser


def test_adaptive_stores_raw_what_the_executor_has_not_started():
    """With its only encoder busy, an adaptive encoding does not wait: every chunk comes
    back raw (its job cancelled) and the payload decodes bit-exactly."""
    raw = tensor_bytes(weights_like(1_500_000, torch.bfloat16))
    release = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(release.wait)
        chunks = iter(codec.Encoding(memoryview(raw), 2, True, executor=pool, adaptive=True))
        first = next(chunks)  # queued behind the blocker, so raw
        rest = list(chunks)
        release.set()
        blocker.result()
    chunks = [first, *rest]
    assert len(chunks) == len(codec.plan_chunks(len(raw), 2)) > 2
    assert all(m["groups"] == [["raw", m["raw"]]] for _, m in chunks)
    meta = {"codec": "zstd", "level": codec.DEFAULT_LEVEL, "chunks": [m for _, m in chunks]}
    assert bytes(decode(b"".join(bytes(p) for p, _ in chunks), meta, len(raw))) == raw


def test_adaptive_with_idle_encoders_compresses_as_much():
    """Asked for its chunks only once the encoders are done, an adaptive encoding gives
    exactly the plain one."""
    raw = tensor_bytes(weights_like(1_500_000, torch.bfloat16))
    with ThreadPoolExecutor(2) as pool:
        encoding = codec.Encoding(memoryview(raw), 2, True, executor=pool, adaptive=True)
        pool.shutdown(wait=True)  # lets every queued chunk finish
        adaptive = list(encoding)
    pieces, meta = codec.encode(memoryview(raw), 2, True)
    assert [m for _, m in adaptive] == meta["chunks"]
    assert b"".join(bytes(p) for p, _ in adaptive) == b"".join(bytes(p) for p in pieces)


def test_plan_chunks_covers_range_in_whole_elements():
    for nbytes, itemsize in [(0, 4), (4, 4), (codec.CHUNK_BYTES * 5 + 8, 8), (12_345_678, 2)]:
        ranges = codec.plan_chunks(nbytes, itemsize)
        bounds = [0] + [b for _, b in ranges]
        assert ranges == list(itertools.pairwise(bounds)) and bounds[-1] == nbytes
        for a, b in ranges:
            assert a % itemsize == 0 and b % itemsize == 0 and 0 < b - a <= codec.CHUNK_BYTES
    with pytest.raises(ValueError):
        codec.plan_chunks(7, 2)


def test_weights_shrink_and_are_byte_grouped():
    payload, meta, nbytes = encoded(600_000, torch.bfloat16)
    assert len(payload) < 0.75 * nbytes
    chunk = meta["chunks"][0]
    assert chunk["split"] == 2 and chunk["groups"][1][0] == "zstd"


def test_small_tensor_left_raw():
    raw = tensor_bytes(weights_like(1000, torch.float32))
    pieces, meta = codec.encode(memoryview(raw), 4, True)
    assert [bytes(p) for p in pieces] == [raw]
    assert meta["chunks"] == [{"raw": 4000, "enc": 4000, "split": 1, "groups": [["raw", 4000]]}]


@pytest.mark.parametrize("itemsize,is_float", [(1, False), (2, True), (4, True), (8, True)])
def test_incompressible_bytes_stored_raw(itemsize, is_float):
    raw = torch.randint(0, 256, (2 * codec.CHUNK_BYTES + 8,), dtype=torch.uint8).numpy().tobytes()
    payload, meta = round_trip(raw, itemsize, is_float)
    assert len(payload) == len(raw)
    assert all(c["groups"] == [["raw", c["raw"]]] for c in meta["chunks"])
    assert len(json.dumps(meta)) < 100 * len(meta["chunks"])


def test_encode_chunk_and_decode_chunk():
    raw = tensor_bytes(weights_like(100_000, torch.float16))
    payload, chunk = codec.encode_chunk(memoryview(raw), 2, True, codec.DEFAULT_LEVEL)
    assert chunk["enc"] == len(payload) < len(raw)
    out = bytearray(len(raw))
    codec.decode_chunk(memoryview(payload), chunk, memoryview(out))
    assert bytes(out) == raw


def test_bit_flip_in_compressed_group_detected():
    payload, meta, nbytes = encoded()
    groups = meta["chunks"][0]["groups"]
    # The exponent group (last) is compressed; flip a bit in its middle.
    start = sum(length for _, length in groups[:-1])
    damaged = bytearray(payload)
    damaged[start + groups[-1][1] // 2] ^= 0x10
    with pytest.raises(CorruptCheckpointError, match="'w'"):
        decode(bytes(damaged), meta, nbytes)


def test_truncated_payload_rejected():
    payload, meta, nbytes = encoded()
    with pytest.raises(CorruptCheckpointError, match="chunk table"):
        decode(payload[:-1], meta, nbytes)


def mutate(meta: dict, path: tuple, value) -> dict:
    """A deep copy of ``meta`` with the item at ``path`` replaced by ``value``."""
    bad = copy.deepcopy(meta)
    node = bad
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return bad


LIES = {
    "enc too long": (("chunks", 0, "enc"), lambda v: v + 1),
    "enc too short": (("chunks", 0, "enc"), lambda v: v - 1),
    "raw huge (bomb)": (("chunks", 0, "raw"), lambda v: 1 << 40),
    "raw bigger than out": (("chunks", 0, "raw"), lambda v: v + 2),
    "raw negative": (("chunks", 0, "raw"), lambda v: -v),
    "raw float": (("chunks", 0, "raw"), float),
    "raw bool": (("chunks", 0, "raw"), lambda v: True),
    "raw string": (("chunks", 0, "raw"), str),
    "group length longer": (("chunks", 0, "groups", 1, 1), lambda v: v + 1),
    "group length negative": (("chunks", 0, "groups", 1, 1), lambda v: -1),
    "unknown mode": (("chunks", 0, "groups", 1, 0), lambda v: "lz4"),
    "raw mode on zstd bytes": (("chunks", 0, "groups", 1, 0), lambda v: "raw"),
    "split unknown": (("chunks", 0, "split"), lambda v: 3),
    "split float": (("chunks", 0, "split"), float),
    "groups missing": (("chunks", 0, "groups"), lambda v: v[:1]),
    "unknown codec": (("codec",), lambda v: "lzma"),
    "level non-int": (("level",), lambda v: "1"),
    "chunks not list": (("chunks",), lambda v: {"0": v[0]}),
}


@pytest.mark.parametrize("lie", list(LIES), ids=list(LIES))
def test_lying_chunk_table_rejected_without_big_allocation(lie):
    payload, meta, nbytes = encoded()
    path, change = LIES[lie]
    node = meta
    for step in path:
        node = node[step]
    bad = mutate(meta, path, change(node))
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError, match="'w'"):
            decode(payload, bad, nbytes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * codec.CHUNK_BYTES


def test_frame_claiming_more_than_chunk_rejected_before_decompressing():
    # A valid frame of 64 MiB of zeros stands in for the group: a decompression bomb.
    bomb = codec._compressor(1, long_matches=False).compress(bytes(64 << 20))
    chunk = {"raw": 4096, "enc": len(bomb), "split": 1, "groups": [["zstd", len(bomb)]]}
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError, match="claims"):
            codec.decode_chunk(memoryview(bomb), chunk, memoryview(bytearray(4096)), key="w")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_trailing_bytes_after_frame_rejected():
    raw = bytes(100_000)
    frame = codec._compressor(1, long_matches=False).compress(raw) + b"xx"
    chunk = {"raw": len(raw), "enc": len(frame), "split": 1, "groups": [["zstd", len(frame)]]}
    with pytest.raises(CorruptCheckpointError):
        codec.decode_chunk(memoryview(frame), chunk, memoryview(bytearray(len(raw))))


def json_values():
    """Arbitrary JSON-like values, small."""
    scalars = st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.text(max_size=5)
    return st.recursive(
        scalars | st.floats(allow_nan=False),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
        ),
        max_leaves=12,
    )


def near_valid_meta():
    """Metas with the right shape and plausible or hostile numbers."""
    lengths = st.integers(-3, 300) | st.sampled_from([1 << 40, 1 << 26, 0])
    group = st.lists(st.sampled_from(["zstd", "raw", "gzip"]) | lengths, min_size=2, max_size=2)
    chunk = st.fixed_dictionaries(
        {
            "raw": lengths,
            "enc": lengths,
            "split": st.sampled_from([1, 2, 4, 8, 0, 3]),
            "groups": st.lists(group, max_size=4),
        }
    )
    return st.fixed_dictionaries(
        {
            "codec": st.sampled_from(["zstd", "none"]),
            "level": st.integers(-5, 30),
            "chunks": st.lists(chunk, max_size=3),
        }
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=st.binary(max_size=400),
    meta=json_values() | near_valid_meta(),
    nbytes=st.integers(0, 600),
)
def test_arbitrary_input_raises_only_corrupt_error(payload, meta, nbytes):
    with contextlib.suppress(CorruptCheckpointError):
        decode(payload, meta, nbytes)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_damaged_real_payload_raises_only_corrupt_error(data):
    payload, meta, nbytes = _SMALL
    damaged = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(damaged) - 1))
        damaged[pos] = data.draw(st.integers(0, 255))
    with contextlib.suppress(CorruptCheckpointError):
        decode(bytes(damaged), meta, nbytes)


_SMALL = encoded(40_000, torch.float32)
