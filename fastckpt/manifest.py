"""The manifest ``fastckpt.json``: the commit marker and the index of a checkpoint.

It is written last, so a directory without it is an unfinished save. Reading it
validates every field the loader will rely on before any shard is touched; see
docs/FORMAT.md for the schema.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from typing import Any

import torch

from .checksum import KINDS
from .errors import CheckpointNotFoundError, CorruptCheckpointError, IncompatibleCheckpointError
from .plan import ST_DTYPES
from .tree import dtype_from_name, unflatten

MANIFEST_NAME = "fastckpt.json"
FORMAT_NAME = "fastckpt"
FORMAT_VERSION = 1
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
    try:
        doc = json.loads(data)
    # ValueError also covers ints past Python's digit limit; RecursionError, deep nesting.
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{path}: manifest is not valid JSON ({e})") from e
    try:
        return parse(doc)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{path}: {e}") from e


def parse(doc: Any) -> Manifest:
    """Validate a decoded manifest document."""
    try:
        return _parse(doc)
    except RecursionError:
        # Error messages repr() the values they refuse; a deep enough one cannot be.
        raise CorruptCheckpointError("manifest nested too deeply") from None


def _parse(doc: Any) -> Manifest:
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
    _require(
        numel * dt.itemsize == off[1] - off[0],
        f"tensor {name!r}: {off[1] - off[0]} bytes cannot hold {dtype}{shape}",
    )
    _require(_digest_ok(t.get("checksum"), kind), f"tensor {name!r}: bad checksum field")
    device = t.get("device", "cpu")
    _require(isinstance(device, str) and _device_ok(device), f"tensor {name!r}: bad device")
    return TensorEntry(
        name, shard, dtype, tuple(shape), off[0], off[1], t.get("checksum"), device
    )


def _device_ok(name: str) -> bool:
    # load(map_location=None) makes a torch.device of it, which raises RuntimeError.
    try:
        torch.device(name)
    except RuntimeError:
        return False
    return True


def _ref(r: Any, tensors: dict[str, TensorEntry]) -> None:
    _require(
        isinstance(r, dict) and isinstance(r.get("tensor"), str) and r["tensor"] in tensors,
        f"bad tensor reference {r!r}",
    )
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
