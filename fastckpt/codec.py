"""Byte-grouped, chunked, parallel zstd for tensor bytes.

Plain zstd gains little on floating-point weights: the sign and exponent bits, which
are highly skewed, share bytes with mantissa bits, which are close to random.  For
floats this codec first rotates each element left by one bit (moving the sign to the
lowest bit, so the top byte holds the exponent alone), then stores byte ``j`` of every
element together in group ``j``.  Groups that shrink under zstd are stored compressed,
the rest verbatim.  Large tensors are cut into chunks that are encoded independently,
so one tensor keeps every thread of a pool busy; zstd, numpy and the extension release
the GIL in their hot loops.  ``docs/CODEC.md`` specifies the encoding.

Where the C++ extension is built, it groups and merges bytes in one pass each, and
codes exponent-like groups as Huffman literals alone (still standard zstd frames, so
any zstd decoder reads them); without it numpy and zstd do the same work, producing
other but equally valid frames that decode to the same bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import zstandard

from . import fileio
from .errors import CorruptCheckpointError

CODECS = ("zstd",)
#: Measured on trained weights: with the group parameters below level 1 already
#: reaches the ratio of level 19 on exponent bytes, and higher levels only cost time.
DEFAULT_LEVEL = 1
#: Below this the per-frame overhead and the thread hand-off outweigh any saving.
MIN_COMPRESS_BYTES = 64 << 10
#: The ratio on trained weights is flat from 256 KiB to 4 MiB chunks; 1 MiB splits
#: mid-sized tensors across threads while keeping per-chunk costs (one task, ~75 bytes
#: of meta, thread-local scratch) negligible.
CHUNK_BYTES = 1 << 20
#: The largest chunk a decoder accepts; bounds the memory one chunk can demand.
MAX_CHUNK_BYTES = 64 << 20

MODES = ("zstd", "raw")
_MAX_EXPANSION = 1 << 15
_LEVEL_RANGE = (-(1 << 17), 22)
_CHUNK_KEYS = frozenset(("raw", "enc", "split", "groups"))
_TENSOR_KEYS = frozenset(("codec", "level", "chunks"))
_UINT = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}

# Exponent bytes are low-entropy but full of short repeats: zstd's default match
# finder spends its time emitting 4-6 byte matches that compress worse than plain
# Huffman literals.  A tiny hash table and 7-byte minimum matches make it keep only
# long matches: ~2.5x faster and ~10 % smaller than level 1's defaults.
_TOP_GROUP_OVERRIDES = {"hash_log": 6, "chain_log": 6, "min_match": 7}
# The other groups mostly hold mantissa bits: near-random bytes whose only redundancy
# is repeated values, which zstd's fast LZ-only mode (negative levels skip Huffman)
# finds at the same ratio as any positive level, up to 1.7x faster.  Some tensors (Adam's
# exp_avg_sq: squares have skewed leading mantissa bits) do gain from Huffman, so a
# sample of each such group decides.  A sample that does not shrink at all (bf16's low
# byte: seven mantissa bits and the sign) has no repeats for LZ either, and the group is
# stored raw without compressing it in vain.
_LOW_GROUP_LEVEL = -1
_PROBE_BYTES = 32 << 10
_PROBE_RATIO = 0.95
_PROBE_RAW_RATIO = 0.99
# Huffman literals alone match zstd on exponent bytes in a fraction of the time, but
# lose badly where long repeats exist (zero-filled or sparse tensors): zstd is kept
# for a group when a sample of it comes out this much smaller than the Huffman frame.
_LZ_PROBE_BYTES = 8 << 10
_LZ_GAIN = 0.9

_local = threading.local()


def plan_chunks(nbytes: int, itemsize: int) -> list[tuple[int, int]]:
    """Split ``[0, nbytes)`` into uncompressed ``(start, stop)`` byte ranges.

    Chunks hold whole elements, are at most ``CHUNK_BYTES`` long (or one element if
    that is larger) and are balanced, so the last chunk is not a tiny remainder.
    """
    if itemsize < 1 or nbytes < 0 or nbytes % itemsize:
        raise ValueError(f"cannot chunk {nbytes} bytes of {itemsize}-byte elements")
    items = nbytes // itemsize
    if items == 0:
        return []
    per_max = max(1, CHUNK_BYTES // itemsize)
    count = -(-items // per_max)
    per = -(-items // count) * itemsize
    return [(start, min(start + per, nbytes)) for start in range(0, nbytes, per)]


def encode_chunk(
    data: memoryview, itemsize: int, is_float: bool, level: int
) -> tuple[bytes | memoryview, dict]:
    """Compress one chunk of contiguous ``itemsize``-byte elements.

    Returns ``(payload, chunk_meta)``; ``chunk_meta`` is
    ``{"raw": n, "enc": len(payload), "split": k, "groups": [[mode, length], ...]}``.
    Floats of 2, 4 or 8 bytes are byte-grouped (``k == itemsize``); everything else is
    one group (``k == 1``).  A chunk that does not shrink is returned verbatim.
    """
    data = _byte_view(data)
    split = itemsize if is_float and itemsize in _UINT and len(data) % itemsize == 0 else 1
    if split == 1:
        parts = [_compress_group(data, _compressor(level, long_matches=False))]
    else:
        *low, top = _split_groups(data, split)
        parts = [_compress_low(g, level) for g in low]
        parts.append(_compress_skewed(top, level))
        if all(mode == "raw" for mode, _ in parts):
            # Nothing shrank: store the bytes as they are rather than shuffled.
            parts, split = [("raw", data)], 1
    payload = parts[0][1] if len(parts) == 1 else b"".join(p for _, p in parts)
    groups = [[mode, len(p)] for mode, p in parts]
    return payload, {"raw": len(data), "enc": len(payload), "split": split, "groups": groups}


def decode_chunk(payload: memoryview, chunk_meta: dict, out: memoryview, key: str = "") -> None:
    """Decode one chunk into ``out`` (writable, exactly the chunk's raw length).

    Every length in ``chunk_meta`` is checked against ``len(payload)`` and ``len(out)``
    before anything is allocated or decompressed; any inconsistency, malformed or
    corrupted zstd frame raises ``CorruptCheckpointError`` naming ``key``.
    """
    payload, out = _byte_view(payload), _byte_view(out)
    raw, enc, split, groups = _chunk_fields(chunk_meta, key)
    if raw != len(out) or enc != len(payload):
        raise _corrupt(key, f"chunk says {enc} -> {raw} bytes, have {len(payload)} -> {len(out)}")
    size = raw // split
    parts, pos = [], 0
    for mode, length in groups:
        piece = payload[pos : pos + length]
        pos += length
        parts.append(piece if mode == "raw" else _decompress(piece, size, key))
    if split == 1:
        fileio.copy_into(out, parts[0])
    else:
        _merge_groups(parts, out, split)


def encode(
    data: memoryview,
    itemsize: int,
    is_float: bool,
    level: int = DEFAULT_LEVEL,
    executor=None,
) -> tuple[list, dict]:
    """Encode a whole tensor's bytes.

    Returns ``(pieces, meta)``: the payload pieces in order (their concatenation is the
    stored payload) and ``{"codec": "zstd", "level": level, "chunks": [chunk_meta...]}``.
    Chunks are encoded on ``executor`` when one is given; it must not be the pool that
    runs this call, or a full pool would wait on itself.
    """
    results = list(Encoding(data, itemsize, is_float, level, executor))
    meta = {"codec": "zstd", "level": level, "chunks": [m for _, m in results]}
    return [p for p, _ in results], meta


class Encoding:
    """A tensor's bytes being encoded: every chunk is queued on ``executor`` (when one
    is given) at construction; iterating yields ``(payload, chunk_meta)`` per chunk in
    order, as :func:`encode` lists them, each as soon as it is ready.

    ``adaptive``: a chunk not yet encoded by the time it is asked for is stored raw
    instead (its job cancelled, or its result dropped). A consumer that paces itself,
    such as a writer waiting for the disk, then gets compressed only what the
    executor keeps ahead of it: compression never makes it wait for the CPU.
    """

    def __init__(self, data: memoryview, itemsize: int, is_float: bool,
                 level: int = DEFAULT_LEVEL, executor=None, adaptive: bool = False) -> None:
        data = _byte_view(data)
        if not isinstance(level, int) or not _LEVEL_RANGE[0] <= level <= _LEVEL_RANGE[1]:
            raise ValueError(f"zstd level must be an int in {_LEVEL_RANGE}, not {level!r}")
        self.adaptive = adaptive
        small = len(data) < MIN_COMPRESS_BYTES
        self._small = _raw_chunk(data) if small and len(data) else None
        self._jobs = [] if small else [(data[a:b], itemsize, is_float, level)
                                       for a, b in plan_chunks(len(data), itemsize)]
        self._futures = None if executor is None else [
            executor.submit(encode_chunk, *job) for job in self._jobs]

    def __iter__(self) -> Iterator[tuple[bytes | memoryview, dict]]:
        if self._small is not None:
            yield self._small
        if self._futures is None:
            yield from (encode_chunk(*job) for job in self._jobs)
            return
        for job, f in zip(self._jobs, self._futures, strict=True):
            if self.adaptive and not f.done():
                f.cancel()  # a chunk already being encoded finishes unused
                yield _raw_chunk(job[0])
            else:
                yield f.result()

    def cancel(self) -> None:
        """Drop the chunks not yet encoded (their consumer has failed)."""
        for f in self._futures or []:
            f.cancel()


def decode_into(
    payload: memoryview, meta: dict, out: memoryview, key: str = "", executor=None
) -> None:
    """Inverse of :func:`encode`: decode ``payload`` into ``out``.

    The whole chunk table is validated first (known codec, every field an int in range,
    encoded lengths summing to ``len(payload)`` and raw lengths to ``len(out)``), then
    the chunks are decoded, on ``executor`` when one is given.
    """
    payload, out = _byte_view(payload), _byte_view(out)
    chunks = _tensor_chunks(meta, key)
    fields = [_chunk_fields(c, key) for c in chunks]
    raw_total = sum(f[0] for f in fields)
    enc_total = sum(f[1] for f in fields)
    if raw_total != len(out) or enc_total != len(payload):
        raise _corrupt(
            key,
            f"chunk table sums to {enc_total} -> {raw_total} bytes, "
            f"have {len(payload)} -> {len(out)}",
        )
    jobs, src, dst = [], 0, 0
    for chunk, (raw, enc, _, _) in zip(chunks, fields, strict=True):
        jobs.append((payload[src : src + enc], chunk, out[dst : dst + raw], key))
        src, dst = src + enc, dst + raw
    _run(decode_chunk, jobs, executor)


def decoded_size(meta: Any, payload_len: int, key: str = "") -> int:
    """Validate a tensor's whole chunk table against its payload length and return
    the number of bytes it decodes to, without decoding (or allocating) anything.

    No valid zstd frame expands more than ``_MAX_EXPANSION`` times (a 128 KiB
    run-length block takes 4 bytes), so a table claiming more is a lie: a reader
    can size its output from this number without trusting the file further.
    """
    fields = [_chunk_fields(c, key) for c in _tensor_chunks(meta, key)]
    enc_total = sum(f[1] for f in fields)
    if enc_total != payload_len:
        raise _corrupt(key, f"chunk table holds {enc_total} bytes, payload has {payload_len}")
    for raw, enc, _, _ in fields:
        if raw > _MAX_EXPANSION * enc:
            raise _corrupt(key, f"chunk claims {raw} bytes from {enc}: impossible for zstd")
    return sum(f[0] for f in fields)


def _run(fn, jobs: list[tuple], executor) -> list:
    """Apply ``fn`` to each argument tuple, on ``executor`` when it helps; keeps order."""
    if executor is None or len(jobs) < 2:
        return [fn(*args) for args in jobs]
    futures = [executor.submit(fn, *args) for args in jobs]
    return [f.result() for f in futures]


def _byte_view(buf) -> memoryview:
    """A flat unsigned-byte view of any contiguous buffer, so lengths count bytes."""
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _raw_chunk(data: memoryview) -> tuple[memoryview, dict]:
    """A chunk stored verbatim."""
    n = len(data)
    return data, {"raw": n, "enc": n, "split": 1, "groups": [["raw", n]]}


def _compressor(level: int, long_matches: bool) -> zstandard.ZstdCompressor:
    """This thread's compressor (zstd contexts are not thread-safe).

    ``long_matches`` applies ``_TOP_GROUP_OVERRIDES``, the setting for skewed bytes.
    """
    cache = _local.__dict__.setdefault("compressors", {})
    cctx = cache.get((level, long_matches))
    if cctx is None:
        # Frame checksums let the decoder catch corruption inside compressed groups
        # for a few percent of the time; content sizes let it check lengths before decoding.
        extra = _TOP_GROUP_OVERRIDES if long_matches else {}
        params = zstandard.ZstdCompressionParameters.from_level(
            level, write_checksum=True, write_content_size=True, **extra
        )
        cctx = zstandard.ZstdCompressor(compression_params=params)
        cache[(level, long_matches)] = cctx
    return cctx


def _compress_low(group: np.ndarray, level: int) -> tuple[str, Any]:
    """A group below the exponent's, judged by a sample: coded like the exponent if
    the sample shrinks, with fast LZ if it shrinks a little, stored raw if not at all."""
    sample = group[:_PROBE_BYTES]
    size = len(_compressor(level, long_matches=True).compress(sample))
    if size < _PROBE_RATIO * len(sample):
        return _compress_skewed(group, level)
    if size >= _PROBE_RAW_RATIO * len(sample):
        return "raw", group
    return _compress_group(group, _compressor(_LOW_GROUP_LEVEL, long_matches=False))


def _compress_skewed(group: np.ndarray, level: int) -> tuple[str, Any]:
    """A group of skewed bytes (an exponent): Huffman literals alone from the extension
    unless zstd's matches pay on a sample (or the extension cannot code the group),
    else zstd with the long-match setting."""
    cctx = _compressor(level, long_matches=True)
    native = fileio.native()
    frame = None if native is None else native.huffman_frame(group)
    if frame is not None:
        sample = group[:_LZ_PROBE_BYTES]
        if len(cctx.compress(sample)) * len(group) >= _LZ_GAIN * len(frame) * len(sample):
            return "zstd", frame
    return _compress_group(group, cctx)


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor; its window limit bounds a hostile frame's memory."""
    dctx = getattr(_local, "decompressor", None)
    if dctx is None:
        dctx = _local.decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_CHUNK_BYTES)
    return dctx


def _compress_group(data, cctx: zstandard.ZstdCompressor | None) -> tuple[str, Any]:
    """``("zstd", frame)`` if the group shrinks, else (or without a compressor)
    ``("raw", data)``."""
    frame = None if cctx is None else cctx.compress(data)
    if frame is not None and len(frame) < len(data):
        return "zstd", frame
    return "raw", data


def _split_groups(data: memoryview, split: int) -> list[np.ndarray]:
    """Rotate each element left by one bit, then gather byte ``j`` of all into group ``j``.

    The rotation moves the sign (random) out of the exponent byte, so the top group
    holds exactly the exponent, the part that compresses.  Byte ``j`` is gathered as
    ``element >> 8j`` cast down to a byte: contiguous arithmetic runs several times
    faster than a strided byte copy; the extension does it all in one pass.  The groups
    are views of this thread's scratch memory, valid until its next call.
    """
    dtype = _UINT[split]
    v = np.frombuffer(data, dtype=dtype)
    groups = _scratch("groups", v.nbytes, np.uint8).reshape(split, v.size)
    native = fileio.native()
    if native is not None:
        native.split_groups(data, split, groups)
        return list(groups)
    rot, tmp = _scratch("rot", v.nbytes, dtype), _scratch("tmp", v.nbytes, dtype)
    np.left_shift(v, 1, out=rot)
    np.right_shift(v, 8 * split - 1, out=tmp)
    np.bitwise_or(rot, tmp, out=rot)
    np.copyto(groups[0], rot, casting="unsafe")
    for j in range(1, split):
        np.right_shift(rot, 8 * j, out=tmp)
        np.copyto(groups[j], tmp, casting="unsafe")
    return list(groups)


def _merge_groups(parts: list, out: memoryview, split: int) -> None:
    """Inverse of :func:`_split_groups`, written into ``out``."""
    native = fileio.native()
    if native is not None:
        native.merge_groups(parts, split, out)
        return
    dtype = _UINT[split]
    x = np.frombuffer(out, dtype=dtype)
    tmp = _scratch("tmp", x.nbytes, dtype)
    np.copyto(x, np.frombuffer(parts[0], dtype=np.uint8))
    for j in range(1, split):
        np.copyto(tmp, np.frombuffer(parts[j], dtype=np.uint8))
        np.left_shift(tmp, 8 * j, out=tmp)
        np.bitwise_or(x, tmp, out=x)
    np.left_shift(x, 8 * split - 1, out=tmp)
    np.right_shift(x, 1, out=x)
    np.bitwise_or(x, tmp, out=x)


def _scratch(name: str, nbytes: int, dtype) -> np.ndarray:
    """``nbytes`` of this thread's reusable memory, viewed as ``dtype``.

    Reusing buffers matters: fresh megabyte-sized temporaries are often returned to
    the OS on free, and faulting their pages back in cost more than the arithmetic.
    Oversized requests (chunks from an encoder with larger chunks) are not kept.
    """
    buf = _local.__dict__.get(name)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(max(nbytes, CHUNK_BYTES), dtype=np.uint8)
        if nbytes <= 4 * CHUNK_BYTES:
            _local.__dict__[name] = buf
    return buf[:nbytes].view(dtype)


def _decompress(frame: memoryview, size: int, key: str) -> bytes:
    """Decompress one frame that must hold exactly ``size`` bytes and nothing after it."""
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as exc:
        raise _corrupt(key, f"bad zstd frame header: {exc}") from exc
    # Checked before decompressing: the header could otherwise make zstd allocate
    # whatever size it claims.
    if params.content_size != size or params.window_size > MAX_CHUNK_BYTES:
        raise _corrupt(
            key,
            f"zstd frame claims {params.content_size} bytes in a {params.window_size}-byte "
            f"window, expected {size}",
        )
    try:
        data = _decompressor().decompress(frame, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise _corrupt(key, f"corrupt zstd frame: {exc}") from exc
    if len(data) != size:
        raise _corrupt(key, f"zstd frame decoded to {len(data)} bytes, expected {size}")
    return data


def _tensor_chunks(meta: Any, key: str) -> list:
    """The chunk list of a tensor's codec meta, after checking its envelope."""
    if not isinstance(meta, dict) or set(meta) != _TENSOR_KEYS:
        raise _corrupt(key, f"codec meta must have exactly the keys {sorted(_TENSOR_KEYS)}")
    if meta["codec"] not in CODECS:
        raise _corrupt(key, f"unknown codec {meta['codec']!r}")
    _int_field(meta["level"], "level", *_LEVEL_RANGE, key=key)
    if not isinstance(meta["chunks"], list):
        raise _corrupt(key, "codec meta 'chunks' must be a list")
    return meta["chunks"]


def _chunk_fields(chunk: Any, key: str) -> tuple[int, int, int, list]:
    """Validate one chunk's meta on its own; returns ``(raw, enc, split, groups)``."""
    if not isinstance(chunk, dict) or set(chunk) != _CHUNK_KEYS:
        raise _corrupt(key, f"chunk meta must have exactly the keys {sorted(_CHUNK_KEYS)}")
    raw = _int_field(chunk["raw"], "raw", 0, MAX_CHUNK_BYTES, key=key)
    # An encoder stores a chunk raw rather than let it grow, so enc <= raw always.
    enc = _int_field(chunk["enc"], "enc", 0, raw, key=key)
    split, groups = _int_field(chunk["split"], "split", 1, 8, key=key), chunk["groups"]
    if split not in (1, *_UINT) or raw % split:
        raise _corrupt(key, f"bad split {split} for a {raw}-byte chunk")
    if not isinstance(groups, list) or len(groups) != split:
        raise _corrupt(key, f"chunk with split {split} needs {split} groups")
    size, total = raw // split, 0
    for group in groups:
        if not isinstance(group, list) or len(group) != 2 or group[0] not in MODES:
            raise _corrupt(key, f"bad group {group!r}")
        length = _int_field(group[1], "group length", 0, enc, key=key)
        if group[0] == "raw" and length != size:
            raise _corrupt(key, f"raw group of {length} bytes, expected {size}")
        total += length
    if total != enc:
        raise _corrupt(key, f"groups hold {total} bytes, chunk says {enc}")
    return raw, enc, split, groups


def _int_field(value: Any, name: str, low: int, high: int, key: str) -> int:
    """``value`` if it is an int (not a bool) in ``[low, high]``."""
    if type(value) is not int or not low <= value <= high:
        raise _corrupt(key, f"{name} must be an int in [{low}, {high}], not {value!r}")
    return value


def _corrupt(key: str, message: str) -> CorruptCheckpointError:
    """The error for a failed decode, naming the tensor when known."""
    return CorruptCheckpointError(f"tensor {key!r}: {message}" if key else message)
