"""Plan a save: dedupe tensors that share storage, assign them to shards, and lay
out each shard's safetensors header, all before a single byte is copied."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from .errors import UnsupportedTypeError
from .fileio import DIRECT_ALIGN
from .tree import Flat, dtype_name

# A shard with at least this much data (before compression) gets a header padded to a
# whole number of O_DIRECT blocks, so that its data section can be written around the
# page cache (see writer.py); below it the padding would cost more than it saves.
DIRECT_MIN = 256 << 10

# torch dtype -> safetensors dtype tag (the shards must stay stock safetensors).
ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.complex64: "C64",
}
ST_DTYPES.update({
    getattr(torch, n): tag
    for n, tag in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                   ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"))
    if hasattr(torch, n)
})


@dataclass
class Stored:
    """A tensor as it is written: one contiguous run of bytes in one shard."""

    name: str
    source: torch.Tensor
    shard: int = -1
    start: int = 0  # byte offset inside the shard's data section, as staged
    compress: bool = False  # encoded by the codec on its way to disk

    @property
    def nbytes(self) -> int:
        return self.source.numel() * self.source.element_size()

    @property
    def stop(self) -> int:
        return self.start + self.nbytes


@dataclass
class ShardPlan:
    index: int
    file: str
    stored: list[Stored] = field(default_factory=list)
    # Length prefix + JSON header as written; for a shard with compressed tensors, a
    # placeholder as long as the largest header it can need (the real one, padded to
    # this length, is written last once the compressed sizes are known).
    header: bytes = b""

    @property
    def compressed(self) -> bool:
        return any(s.compress for s in self.stored)

    @property
    def raw_bytes(self) -> int:
        """Bytes of the uncompressed tensors, which lie first in the data section."""
        return sum(s.nbytes for s in self.stored if not s.compress)

    @property
    def data_bytes(self) -> int:
        """Bytes of the data section as staged (compressed tensors included, raw)."""
        return max((s.stop for s in self.stored), default=0)

    @property
    def size(self) -> int:
        return len(self.header) + self.data_bytes

    @property
    def direct(self) -> bool:
        """Whether the data section starts on an O_DIRECT block boundary."""
        return len(self.header) % DIRECT_ALIGN == 0


@dataclass
class Plan:
    flat: Flat
    stored: list[Stored]
    refs: list[dict]
    shards: list[ShardPlan]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.stored)


def make_plan(flat: Flat, shard_size: int, compress_min: int | None = None) -> Plan:
    """Dedupe shared storage, then pack stored tensors into shards of ~``shard_size``;
    with ``compress_min``, tensors of at least that many bytes are to be compressed."""
    stored, refs = dedupe(flat)
    mark_compressed(stored, compress_min)
    return Plan(flat, stored, refs, assign_shards(stored, shard_size))


def mark_compressed(stored: list[Stored], compress_min: int | None) -> None:
    """Mark the tensors of at least ``compress_min`` bytes for compression (none if None)."""
    if compress_min is not None:
        for s in stored:
            s.compress = s.nbytes >= compress_min


def check_tensor(t: torch.Tensor, path: str) -> None:
    """Raise :class:`UnsupportedTypeError` naming ``path`` unless ``t`` can be stored."""
    if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
        raise UnsupportedTypeError(f"tensor at {path!r} ({t.layout}, {t.device}) cannot be stored")
    if t.dtype not in ST_DTYPES:
        raise UnsupportedTypeError(f"tensor at {path!r} has unsupported dtype {t.dtype}")


def _storage_key(t: torch.Tensor) -> Any:
    if t.numel() == 0:
        return None
    ptr = t.untyped_storage().data_ptr()
    return (t.device, ptr) if ptr else None


def dedupe(flat: Flat, names: StoredNames | None = None) -> tuple[list[Stored], list[dict]]:
    """The tensors to store (storage shared by several tensors once, named after the
    first key path using it, unique among ``names``) and, per tensor of ``flat``, its
    manifest reference."""
    groups: dict[Any, list[int]] = {}
    for i, (t, p) in enumerate(zip(flat.tensors, flat.paths, strict=True)):
        check_tensor(t, p)
        groups.setdefault(_storage_key(t) or ("unique", i), []).append(i)
    names = names or StoredNames()
    stored: list[Stored] = []
    refs: list[dict] = [{}] * len(flat.tensors)
    for idx in groups.values():
        _store_group(flat, idx, names, stored, refs)
    return stored, refs


class StoredNames:
    """Unique stored-tensor names derived from key paths (``used``: names taken)."""

    def __init__(self, used: Any = ()) -> None:
        self.used: set[str] = set(used)

    def __call__(self, path: str) -> str:
        name, n = path or "<root>", 1
        while name in self.used:
            n += 1
            name = f"{path}~{n}"
        self.used.add(name)
        return name


def _layout(t: torch.Tensor) -> tuple:
    return (t.dtype, t.storage_offset(), tuple(t.shape), t.stride())


def _store_group(flat: Flat, idx: list[int], names: StoredNames, stored: list, refs: list) -> None:
    ts = [flat.tensors[i] for i in idx]
    if len({_layout(t) for t in ts}) == 1:  # one tensor, or the same one several times
        s = Stored(names(flat.paths[idx[0]]), ts[0])
        stored.append(s)
        for i in idx:
            refs[i] = {"tensor": s.name, "path": flat.paths[i]}
        return
    if len({t.dtype for t in ts}) > 1:
        # Views of one storage as different dtypes: store each on its own (not shared).
        for i in idx:
            _store_group(flat, [i], names, stored, refs)
        return
    lo = min(t.storage_offset() for t in ts)
    hi = max(t.storage_offset() + _extent(t) for t in ts)
    # Storages of one address may differ in size (numpy arrays of one buffer each get
    # their own, sized to the view); the largest holds every tensor of the group.
    storage = max((t.untyped_storage() for t in ts), key=lambda st: st.nbytes())
    base = torch.empty(0, dtype=ts[0].dtype, device=ts[0].device)
    base.set_(storage, lo, (hi - lo,), (1,))
    s = Stored(names(flat.paths[idx[0]]), base)
    stored.append(s)
    for i, t in zip(idx, ts, strict=True):
        view = {
            "offset": t.storage_offset() - lo,
            "shape": list(t.shape),
            "stride": list(t.stride()),
        }
        refs[i] = {"tensor": s.name, "path": flat.paths[i], "view": view}


def _extent(t: torch.Tensor) -> int:
    return sum((d - 1) * s for d, s in zip(t.shape, t.stride(), strict=True)) + 1


T = TypeVar("T")


def pack(items: list[T], limit: int) -> list[list[T]]:
    """Split ``items`` (each with ``nbytes``), in order, into runs of at most ``limit``
    bytes; an item larger than ``limit`` gets a run of its own. Never empty."""
    bins: list[list[T]] = [[]]
    used = 0
    for item in items:
        if bins[-1] and used + item.nbytes > limit:
            bins.append([])
            used = 0
        bins[-1].append(item)
        used += item.nbytes
    return bins


def assign_shards(stored: list[Stored], shard_size: int,
                  name: Callable[[int, int], str] | None = None) -> list[ShardPlan]:
    """Pack ``stored`` in order into shards of about ``shard_size`` bytes and lay out
    their headers; ``name(k, n)`` names shard ``k`` of ``n`` (default
    :func:`shard_file_name`)."""
    name = name or shard_file_name
    bins = pack(stored, shard_size)
    n = len(bins)
    shards = [ShardPlan(k, name(k, n)) for k in range(n)]
    for shard, members in zip(shards, bins, strict=True):
        _layout_shard(shard, members)
    return shards


def shard_file_name(k: int, n: int) -> str:
    return f"shard-{k + 1:05d}-of-{n:05d}.safetensors"


def _layout_shard(shard: ShardPlan, members: list[Stored]) -> None:
    # safetensors allows no holes between tensors, so alignment comes from the order:
    # widest elements first keeps every tensor aligned to its own element size, which
    # lets loads map them zero-copy. Compressed payloads (bytes) go after all of those.
    members = sorted(members, key=lambda s: (s.compress, -s.source.element_size()))
    offset = 0
    for s in members:
        if s.compress:
            # Staged offsets only (the payloads follow each other on disk): a
            # compressed tensor after odd-sized raw ones starts on an element boundary,
            # so that staging blocks cut it into whole elements, as the codec needs.
            offset += -offset % s.source.element_size()
        s.shard, s.start = shard.index, offset
        offset += s.nbytes
    shard.stored = members
    # A payload is never larger than its tensor, so no offset or length exceeds the raw
    # size: a header with that size everywhere is at least as long as the real one.
    bound = max(offset, 1)
    payloads = {s.name: (bound, 2 * bound) for s in members if s.compress}
    align = DIRECT_ALIGN if sum(s.nbytes for s in members) >= DIRECT_MIN else 8
    shard.header = shard_header(members, payloads, align=align)


def shard_header(members: list[Stored], payloads: dict[str, tuple[int, int]],
                 pad_to: int = 0, align: int = 8) -> bytes:
    """The shard's safetensors header; ``payloads`` gives the on-disk ``[start, stop)``
    of each compressed tensor (stored as ``U8`` bytes). Padding as in
    :func:`encode_header`."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": "fastckpt"}}
    for s in members:
        if s.compress:
            a, b = payloads[s.name]
            header[s.name] = {"dtype": "U8", "shape": [b - a], "data_offsets": [a, b]}
        else:
            header[s.name] = {"dtype": ST_DTYPES[s.source.dtype], "shape": list(s.source.shape),
                              "data_offsets": [s.start, s.stop]}
    return encode_header(header, pad_to, align)


def encode_header(header: dict, pad_to: int = 0, align: int = 8) -> bytes:
    """Length-prefixed safetensors header, space-padded so the data starts at a
    multiple of ``align`` (8 or a multiple of it), or, with ``pad_to``, to exactly that
    many bytes in all."""
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * (-(8 + len(body)) % align)
    if pad_to:
        if 8 + len(body) > pad_to:
            raise ValueError(f"header of {8 + len(body)} bytes exceeds its {pad_to}-byte slot")
        body += b" " * (pad_to - 8 - len(body))
    return len(body).to_bytes(8, "little") + body


def manifest_tensor(s: Stored, written: dict) -> dict:
    """The manifest entry for a stored tensor; ``written`` holds what the writer
    learned (checksums; for compressed tensors their offsets and chunk table)."""
    entry = {
        "shard": s.shard,
        "dtype": dtype_name(s.source.dtype),
        "shape": list(s.source.shape),
        "offsets": [s.start, s.stop],
        "device": str(s.source.device),
    }
    entry.update(written)
    return entry
