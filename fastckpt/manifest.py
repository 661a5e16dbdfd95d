"""The manifest ``fastckpt.json``: the commit marker and the index of a checkpoint.

It is written last, so a directory without it is an unfinished save. Reading it
validates every field the loader will rely on before any shard is touched; see
docs/FORMAT.md for the schema.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import torch

from . import __version__, codec
from . import checksum as ck
from .checksum import KINDS
from .errors import CheckpointNotFoundError, CorruptCheckpointError, IncompatibleCheckpointError
from .plan import ST_DTYPES
from .tree import dtype_from_name, unflatten

MANIFEST_NAME = "fastckpt.json"
FORMAT_NAME = "fastckpt"
FORMAT_VERSION = 1
# Upgrades of older manifests: MIGRATIONS[v] turns a format-v document into a format-(v+1)
# one, and documents are upgraded step by step before validation, so the parser only ever
# knows the current format. Format 1 is the first: a future format 2 registers
# MIGRATIONS[1] here.
MIGRATIONS: dict[int, Callable[[dict], dict]] = {}
# A manifest larger than this is not one we wrote; refuse before reading it into memory.
MAX_MANIFEST_BYTES = 1 << 30
# fastckpt's shard names, and the Hugging Face ones (fastckpt.integrations.hf).
_SHARD_FILE = re.compile(r"^(shard|model)-\d{5,}-of-\d{5,}\.safetensors$|^model\.safetensors$")


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor: where its bytes are and what they must hash to."""

    name: str
    shard: int
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int
    checksum: str | None
    device: str = "cpu"
    codec: dict | None = None  # chunk table of a compressed tensor (its bytes: a payload)
    raw_checksum: str | None = None  # digest of a compressed tensor's decoded bytes

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor itself (decoded)."""
        n = self.dtype_obj.itemsize
        for d in self.shape:
            n *= d
        return n

    @property
    def dtype_obj(self):
        return dtype_from_name(self.dtype)


@dataclass(frozen=True)
class ShardEntry:
    file: str
    size: int
    checksum: str | None


@dataclass
class Manifest:
    """A parsed manifest. Shards, format and metadata are validated on parse; tensor
    entries and references are validated when first used (all of them by
    :attr:`tensors` / :attr:`refs`), so opening a checkpoint of many tensors to
    read one stays cheap."""

    checksum: str | None
    shards: list[ShardEntry]
    tree: Any
    metadata: dict
    raw: dict
    ranks: list | None = None  # per-rank trees of a multi-rank save (docs/DISTRIBUTED.md)
    _tensor_docs: dict = field(repr=False, default_factory=dict)
    _ref_docs: list = field(repr=False, default_factory=list)
    _tensors: dict[str, TensorEntry] = field(repr=False, default_factory=dict)
    _checked_refs: set[int] = field(repr=False, default_factory=set)
    _members: list[list[TensorEntry]] | None = field(default=None, repr=False)

    def tensor(self, name: str) -> TensorEntry:
        """The validated entry of stored tensor ``name``."""
        t = self._tensors.get(name)
        if t is None:
            if name not in self._tensor_docs:
                raise CorruptCheckpointError(f"no stored tensor {name!r}")
            t = self._tensors[name] = _tensor(
                name, self._tensor_docs[name], len(self.shards), self.checksum
            )
        return t

    @property
    def tensors(self) -> dict[str, TensorEntry]:
        """Every stored tensor's validated entry."""
        if len(self._tensors) != len(self._tensor_docs):
            for name in self._tensor_docs:
                self.tensor(name)
        return self._tensors

    def ref(self, index: int) -> dict:
        """Reference ``index`` of the tree, validated against its stored tensor."""
        if not 0 <= index < len(self._ref_docs):
            raise CorruptCheckpointError(
                f"tree refers to tensor #{index} of {len(self._ref_docs)}"
            )
        r = self._ref_docs[index]
        if index not in self._checked_refs:
            _ref(r, self)
            self._checked_refs.add(index)
        return r

    @property
    def refs(self) -> list[dict]:
        """Every reference, validated."""
        return [self.ref(i) for i in range(len(self._ref_docs))]

    def ref_paths(self) -> list[str]:
        """Each reference's key path (``#i`` where a writer recorded none)."""
        paths = []
        for i, r in enumerate(self._ref_docs):
            p = r.get("path", f"#{i}") if isinstance(r, dict) else None
            _require(isinstance(p, str), f"bad key path in reference #{i}")
            paths.append(p)
        return paths

    def validate(self) -> None:
        """Validate every tensor entry and reference now."""
        for i in range(len(self._ref_docs)):
            self.ref(i)
        for name in self._tensor_docs:
            self.tensor(name)

    def shard_members(self, index: int) -> list[TensorEntry]:
        """The tensors of shard ``index`` in file order: by start, then by end, so
        that an empty tensor comes before the tensor that starts where it lies (as
        writers place them; empty tensors at one offset have equal checksums, so
        their order among themselves does not matter)."""
        if self._members is None:
            members: list[list[TensorEntry]] = [[] for _ in self.shards]
            for t in self.tensors.values():
                members[t.shard].append(t)
            self._members = [sorted(ts, key=lambda t: (t.start, t.stop)) for ts in members]
        return self._members[index]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (each stored tensor once, decoded)."""
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def disk_bytes(self) -> int:
        """Bytes of tensor data on disk (compressed tensors count their payload)."""
        return sum(t.stop - t.start for t in self.tensors.values())


def document(checksum: str | None, shards: list[dict], tensors: dict, refs: list, tree: Any,
             metadata: Any, **extra: Any) -> dict:
    """A manifest document (docs/FORMAT.md) stamped with the format, this writer's
    library versions and the time; ``extra`` adds optional fields (``ranks``)."""
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "created": time.time(),
        "library": {"fastckpt": __version__, "torch": torch.__version__},
        "checksum": checksum, "shards": shards, "tensors": tensors, "refs": refs,
        "tree": tree, "metadata": metadata, **extra,
    }


def encode(doc: dict) -> bytes:
    """Serialise a manifest document (strict JSON: no NaN literals)."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")


# A manifest with checksums opens with its own digest, over every byte after it.
_SEAL = b'{"manifest_checksum":"'


def seal(doc: dict) -> bytes:
    """The manifest file's bytes: ``doc`` encoded and, unless checksums are off, led by
    ``manifest_checksum``, the digest of the rest of the file. Shard and tensor digests
    cover the data; this one covers the tree, references, metadata and those digests."""
    body = encode(doc)
    kind = doc["checksum"]
    if kind is None:
        return body
    return _SEAL + ck.digest(kind, body[1:]).encode("ascii") + b'",' + body[1:]


def _check_seal(data: bytes, doc: dict) -> None:
    kind, want = doc.get("checksum"), doc.get("manifest_checksum")
    if kind is None or kind not in KINDS:
        _require(want is None, "manifest_checksum without a checksum kind")
        return  # a bad kind is refused by the parser with its own message
    _require(isinstance(want, str), "manifest_checksum missing")
    head = _SEAL + want.encode("utf-8", "replace") + b'",'
    _require(data.startswith(head), "manifest_checksum is not the manifest's first field")
    _require(ck.digest(kind, memoryview(data)[len(head):]) == want,
             "manifest checksum mismatch: the manifest is damaged")


_gc_lock = threading.Lock()
_gc_pauses = 0  # readers inside _collector_paused
_gc_was_enabled = False  # the collector's state when the first of them came in


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector. Decoding and parsing the manifest of a
    checkpoint with many tensors allocates hundreds of thousands of objects at once,
    which makes the collector run full passes over the whole heap (over 100 ms in a
    process that has imported torch, against 15 ms for the decoding itself); JSON
    values hold no cycles, so there is nothing for it to find.

    The switch is the whole process's: readers on several threads share one pause,
    and the last to leave restores the state the first found."""
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


def read(ckpt_dir: str, lazy: bool = False) -> Manifest:
    """Read and validate ``ckpt_dir``'s manifest, raising a ``CheckpointError`` subclass
    (``lazy``: leave tensor entries and references to be validated on use)."""
    path = os.path.join(ckpt_dir, MANIFEST_NAME)
    try:
        # O_NONBLOCK: opening a FIFO planted under the manifest's name would block forever.
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise CorruptCheckpointError(f"{path}: not a regular file")
            size = st.st_size
            if size > MAX_MANIFEST_BYTES:
                raise CorruptCheckpointError(f"{path}: manifest of {size} bytes is implausible")
            data = f.read()
    except FileNotFoundError:
        if os.path.isdir(ckpt_dir):
            raise CheckpointNotFoundError(
                f"{ckpt_dir}: no {MANIFEST_NAME}; not a committed fastckpt checkpoint"
            ) from None
        raise CheckpointNotFoundError(f"{ckpt_dir}: no such checkpoint") from None
    except NotADirectoryError:
        raise CheckpointNotFoundError(f"{ckpt_dir}: not a checkpoint directory") from None
    except OSError as e:  # a directory in its place, no permission, a symlink loop...
        raise CorruptCheckpointError(f"{path}: cannot read the manifest: {e}") from e
    with _collector_paused():
        try:
            doc = orjson.loads(data)
        # orjson's JSONDecodeError is a ValueError; RecursionError: deep nesting.
        except (ValueError, RecursionError) as e:
            raise CorruptCheckpointError(f"{path}: manifest is not valid JSON ({e})") from e
        try:
            if isinstance(doc, dict):
                _check_seal(data, doc)
            return parse(doc, lazy)
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"{path}: {e}") from e


def parse(doc: Any, lazy: bool = False) -> Manifest:
    """Validate a decoded manifest document (all of it unless ``lazy``)."""
    try:
        return _parse(doc, lazy)
    except RecursionError:
        # Error messages repr() the values they refuse; a deep enough one cannot be.
        raise CorruptCheckpointError("manifest nested too deeply") from None


def _parse(doc: Any, lazy: bool) -> Manifest:
    _require(isinstance(doc, dict), "manifest is not a JSON object")
    _require(doc.get("format") == FORMAT_NAME, "not a fastckpt manifest")
    version = doc.get("format_version")
    _require(type(version) is int, "format_version missing")
    if version > FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"checkpoint format_version {version} is newer than this fastckpt reads "
            f"({FORMAT_VERSION}); upgrade fastckpt"
        )
    _require(version >= 1, f"format_version {version} is invalid")
    doc = migrate(doc)
    kind = doc.get("checksum")
    _require(kind is None or kind in KINDS, f"unknown checksum kind {kind!r}")
    shards = [_shard(s, kind) for s in _list(doc, "shards")]
    _require(len({s.file for s in shards}) == len(shards), "duplicate shard file names")
    tensors_doc = doc.get("tensors")
    _require(isinstance(tensors_doc, dict), "tensors is not an object")
    metadata = unflatten(doc.get("metadata", {"$dict": []}), _no_tensor)
    _require(isinstance(metadata, dict), "metadata is not an object")
    ranks = doc.get("ranks")
    _require(ranks is None or isinstance(ranks, list), "ranks is not a list")
    m = Manifest(kind, shards, doc.get("tree"), metadata, doc, ranks, tensors_doc,
                 _list(doc, "refs"))
    if not lazy:
        m.validate()
    return m


def migrate(doc: dict) -> dict:
    """Upgrade a manifest document of an older format version to the current one."""
    version = doc["format_version"]
    while version < FORMAT_VERSION:
        step = MIGRATIONS.get(version)
        if step is None:
            raise IncompatibleCheckpointError(
                f"checkpoint format_version {version} cannot be upgraded by this fastckpt"
            )
        doc = step(dict(doc))
        version += 1
        doc["format_version"] = version
    return doc


def _no_tensor(index: int, tag: str) -> Any:
    raise CorruptCheckpointError("metadata refers to a tensor")


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise CorruptCheckpointError(msg)


def _list(doc: dict, key: str) -> list:
    v = doc.get(key)
    _require(isinstance(v, list), f"{key} is not a list")
    return v


def _nat(v: Any) -> bool:
    return type(v) is int and v >= 0


# torch's sizes, strides and offsets are int64.
_INT64_END = 2**63


def _shape_ok(shape: list) -> bool:
    """Whether ``shape``'s sizes, and their product, fit torch's int64 sizes."""
    return all(_nat(d) and d < _INT64_END for d in shape) and math.prod(shape) < _INT64_END


def _digest_ok(v: Any, kind: str | None) -> bool:
    return v is None if kind is None else isinstance(v, str) and bool(re.fullmatch(r"[0-9a-f]+", v))


def _shard(s: Any, kind: str | None) -> ShardEntry:
    _require(isinstance(s, dict), "shard entry is not an object")
    f = s.get("file")
    # Shard names are joined to the checkpoint directory: allow only our own pattern so
    # a manifest can never make us read outside it (no '..', '/', NUL).
    _require(isinstance(f, str) and bool(_SHARD_FILE.match(f)), f"bad shard file name {f!r}")
    _require(_nat(s.get("size")), f"shard {f}: bad size")
    _require(_digest_ok(s.get("checksum"), kind), f"shard {f}: bad checksum field")
    return ShardEntry(f, s["size"], s.get("checksum"))


def _tensor(name: str, t: Any, nshards: int, kind: str | None) -> TensorEntry:
    _require(isinstance(t, dict), f"tensor {name!r}: entry is not an object")
    shard, shape, off = t.get("shard"), t.get("shape"), t.get("offsets")
    _require(_nat(shard) and shard < nshards, f"tensor {name!r}: bad shard index {shard!r}")
    # A dimension past int64 fits no tensor: with another dimension 0 the byte count
    # below still matches, and torch would raise OverflowError on load.
    _require(
        isinstance(shape, list) and all(_nat(d) and d < 2**63 for d in shape),
        f"tensor {name!r}: bad shape",
    )
    _require(
        isinstance(off, list) and len(off) == 2 and all(_nat(o) for o in off) and off[0] <= off[1],
        f"tensor {name!r}: bad offsets",
    )
    dtype = t.get("dtype")
    try:
        dt = dtype_from_name(dtype)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"tensor {name!r}: {e}") from None
    # The tree may name any dtype; a stored tensor only one that safetensors can hold.
    _require(dt in ST_DTYPES, f"tensor {name!r}: dtype {dtype} is not stored in shards")
    numel = 1
    for d in shape:
        numel *= d
    meta = t.get("codec")
    # A compressed tensor's chunk table must decode to exactly the tensor's bytes;
    # a plain one's offsets must span them.
    held = off[1] - off[0] if meta is None else codec.decoded_size(meta, off[1] - off[0], name)
    _require(numel * dt.itemsize == held,
             f"tensor {name!r}: {held} bytes cannot hold {dtype}{shape}")
    _require(_digest_ok(t.get("checksum"), kind), f"tensor {name!r}: bad checksum field")
    raw_digest = t.get("raw_checksum")
    raw_ok = raw_digest is None if meta is None else _digest_ok(raw_digest, kind)
    _require(raw_ok, f"tensor {name!r}: bad raw_checksum field")
    device = t.get("device", "cpu")
    _require(isinstance(device, str) and _device_ok(device), f"tensor {name!r}: bad device")
    return TensorEntry(name, shard, dtype, tuple(shape), off[0], off[1], t.get("checksum"),
                       device, meta, raw_digest)


def _device_ok(name: str) -> bool:
    # load(map_location=None) makes a torch.device of it, which raises RuntimeError.
    try:
        torch.device(name)
    except RuntimeError:
        return False
    return True


def _ref(r: Any, m: Manifest) -> None:
    if isinstance(r, dict) and "pieces" in r:
        _pieces_ref(r, m)
        return
    _require(isinstance(r, dict) and isinstance(r.get("tensor"), str)
             and r["tensor"] in m._tensor_docs, f"bad tensor reference {r!r}")
    base = m.tensor(r["tensor"])
    _require(isinstance(r.get("path", ""), str), f"bad key path in {r!r}")
    view = r.get("view")
    if view is None:
        return
    _require(isinstance(view, dict), f"bad view {view!r}")
    off, shape, stride = view.get("offset"), view.get("shape"), view.get("stride")
    _require(
        _nat(off)
        and isinstance(shape, list)
        and isinstance(stride, list)
        and len(shape) == len(stride)
        and _shape_ok(shape)
        and all(_nat(x) and x < _INT64_END for x in [off, *stride]),
        f"bad view {view!r}",
    )
    # The view must stay inside its base, or as_strided would read foreign memory.
    numel = 1
    for d in base.shape:
        numel *= d
    steps = sum((d - 1) * s for d, s in zip(shape, stride, strict=True))
    extent = off + steps + 1 if all(shape) else 0
    _require(extent <= numel, f"view {view!r} reaches past its base {base.name!r}")


def _pieces_ref(r: dict, m: Manifest) -> None:
    """A tensor saved in pieces (by several ranks): each piece is a stored tensor of the
    same dtype placed at ``offset``; together they must tile the whole shape exactly,
    so assembling it leaves no byte unwritten."""
    shape, pieces = r.get("shape"), r.get("pieces")
    _require(isinstance(r.get("path"), str), f"bad key path in {r.get('path')!r}")
    _require(isinstance(shape, list) and _shape_ok(shape), f"bad shape in {r['path']!r}")
    try:
        dtype_from_name(r.get("dtype"))
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{r['path']!r}: {e}") from None
    _require(isinstance(pieces, list), f"bad pieces of {r['path']!r}")
    boxes = []
    for p in pieces:
        ok = isinstance(p, dict) and isinstance(p.get("tensor"), str) \
            and p["tensor"] in m._tensor_docs and isinstance(p.get("offset"), list) \
            and len(p["offset"]) == len(shape) and all(_nat(o) for o in p["offset"])
        _require(ok, f"bad piece {p!r} of {r['path']!r}")
        t = m.tensor(p["tensor"])
        _require(t.dtype == r["dtype"] and len(t.shape) == len(shape)
                 and all(o + n <= d for o, n, d in zip(p["offset"], t.shape, shape, strict=True)),
                 f"piece {p['tensor']!r} does not fit {r['path']!r}")
        boxes.append((p["offset"], t.shape))
    _require(tiles(boxes, shape), f"the pieces of {r['path']!r} do not tile its shape")


def tiles(boxes: list[tuple[list[int], tuple[int, ...]]], shape: list[int]) -> bool:
    """Whether boxes (offset, shape), each inside ``shape``, cover it exactly: their
    volumes add up to it and no two overlap."""
    boxes = [(o, n) for o, n in boxes if math.prod(n)]
    if sum(math.prod(n) for _, n in boxes) != math.prod(shape):
        return False
    if len(boxes) < 2:
        return True
    lo = np.array([o for o, _ in boxes], dtype=np.int64)
    hi = lo + np.array([n for _, n in boxes], dtype=np.int64)
    split = [d for d in range(len(shape)) if (lo[:, d] != lo[0, d]).any()
             or (hi[:, d] != hi[0, d]).any()]
    if len(split) == 1:  # the usual case, pieces along one dimension: sort, compare neighbours
        order = np.argsort(lo[:, split[0]])
        return bool((hi[order[:-1], split[0]] <= lo[order[1:], split[0]]).all())
    # Boxes overlap when their ranges overlap in every dimension.
    overlap = ((lo[:, None, :] < hi[None, :, :]) & (lo[None, :, :] < hi[:, None, :])).all(-1)
    np.fill_diagonal(overlap, False)
    return not overlap.any()
