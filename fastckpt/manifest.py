"""The manifest ``fastckpt.json``: the commit marker and the index of a checkpoint.

It is written last, so a directory without it is an unfinished save. Reading it
validates every field the loader will rely on before any shard is touched; see
docs/FORMAT.md for the schema.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .checksum import KINDS
from .errors import CheckpointNotFoundError, CorruptCheckpointError, IncompatibleCheckpointError
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
_SHARD_FILE = re.compile(r"^shard-\d{5,}-of-\d{5,}\.safetensors$")


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


@dataclass(frozen=True)
class ShardEntry:
    file: str
    size: int
    checksum: str | None


@dataclass
class Manifest:
    """A parsed, validated manifest."""

    checksum: str | None
    shards: list[ShardEntry]
    tensors: dict[str, TensorEntry]
    refs: list[dict]
    tree: Any
    metadata: dict
    raw: dict

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data stored (each stored tensor once)."""
        return sum(t.stop - t.start for t in self.tensors.values())


def encode(doc: dict) -> bytes:
    """Serialise a manifest document (strict JSON: no NaN literals)."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")


def read(ckpt_dir: str) -> Manifest:
    """Read and validate ``ckpt_dir``'s manifest, raising a ``CheckpointError`` subclass."""
    path = os.path.join(ckpt_dir, MANIFEST_NAME)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
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
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: manifest is not valid JSON ({e})") from e
    try:
        return parse(doc)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{path}: {e}") from e


def parse(doc: Any) -> Manifest:
    """Validate a decoded manifest document."""
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
    tensors = {n: _tensor(n, t, len(shards), kind) for n, t in tensors_doc.items()}
    refs = _list(doc, "refs")
    for r in refs:
        _ref(r, tensors)
    metadata = unflatten(doc.get("metadata", {"$dict": []}), _no_tensor)
    _require(isinstance(metadata, dict), "metadata is not an object")
    return Manifest(kind, shards, tensors, refs, doc.get("tree"), metadata, doc)


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
    _require(isinstance(shape, list) and all(_nat(d) for d in shape), f"tensor {name!r}: bad shape")
    _require(
        isinstance(off, list) and len(off) == 2 and all(_nat(o) for o in off) and off[0] <= off[1],
        f"tensor {name!r}: bad offsets",
    )
    dtype = t.get("dtype")
    try:
        dt = dtype_from_name(dtype)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"tensor {name!r}: {e}") from None
    numel = 1
    for d in shape:
        numel *= d
    _require(
        numel * dt.itemsize == off[1] - off[0],
        f"tensor {name!r}: {off[1] - off[0]} bytes cannot hold {dtype}{shape}",
    )
    _require(_digest_ok(t.get("checksum"), kind), f"tensor {name!r}: bad checksum field")
    device = t.get("device", "cpu")
    _require(isinstance(device, str), f"tensor {name!r}: bad device")
    return TensorEntry(
        name, shard, dtype, tuple(shape), off[0], off[1], t.get("checksum"), device
    )


def _ref(r: Any, tensors: dict[str, TensorEntry]) -> None:
    _require(isinstance(r, dict) and r.get("tensor") in tensors, f"bad tensor reference {r!r}")
    view = r.get("view")
    if view is None:
        return
    base = tensors[r["tensor"]]
    _require(isinstance(view, dict), f"bad view {view!r}")
    off, shape, stride = view.get("offset"), view.get("shape"), view.get("stride")
    _require(
        _nat(off)
        and isinstance(shape, list)
        and isinstance(stride, list)
        and len(shape) == len(stride)
        and all(_nat(x) for x in shape + stride),
        f"bad view {view!r}",
    )
    # The view must stay inside its base, or as_strided would read foreign memory.
    numel = 1
    for d in base.shape:
        numel *= d
    steps = sum((d - 1) * s for d, s in zip(shape, stride, strict=True))
    extent = off + steps + 1 if all(shape) else 0
    _require(extent <= numel, f"view {view!r} reaches past its base {base.name!r}")
