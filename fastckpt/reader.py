"""Reading checkpoints: validate shards against the manifest, map or read tensors,
rebuild the object, and verify checksums.

Nothing here trusts a byte of the files: header lengths, offsets, dtypes and shapes
are checked against the file size and the manifest before any buffer is sized by
them or any memory is viewed through them.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import mmap as mmap_mod
import os
import stat
from dataclasses import dataclass, field
from typing import Any

import torch

from . import checksum as ck
from . import manifest as mf
from .commit import OLD_TAG, _leftovers, is_checkpoint
from .errors import CheckpointError, CorruptCheckpointError
from .plan import ST_DTYPES
from .tree import dtype_from_name, unflatten

MAX_HEADER_BYTES = 100 << 20



def resolve(path: Any) -> str:
    """The directory holding the committed checkpoint named by ``path``.

    If a crash fell between the two renames of a non-atomic replace, the previous
    checkpoint is still whole under its hidden ``-old-`` name: read that one.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.lexists(path):
        olds = [o for o in _leftovers(path, OLD_TAG) if is_checkpoint(o)]
        if olds:
            return max(olds, key=os.path.getmtime)
    return path


@dataclass
class Shard:
    """An open shard file, validated against its manifest entry."""

    path: str
    fd: int
    size: int
    data_start: int
    header: bytes

    def close(self) -> None:
        os.close(self.fd)


def open_shard(ckpt: str, m: mf.Manifest, index: int) -> Shard:
    """Open shard ``index`` and check its header against the manifest."""
    entry = m.shards[index]
    path = os.path.join(ckpt, entry.file)
    try:
        # O_NONBLOCK: a FIFO in a shard's place must not block the open (see _read_header).
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: shard file is missing") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open shard: {e}") from e
    try:
        shard = _read_header(path, fd)
        _match_header(shard, m, index, entry)
        return shard
    except BaseException:
        os.close(fd)
        raise


def _pread_exact(fd: int, n: int, offset: int, path: str) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise CorruptCheckpointError(f"{path}: truncated (wanted {n} bytes at {offset})")
    return data


def _read_header(path: str, fd: int) -> Shard:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise CorruptCheckpointError(f"{path}: shard is not a regular file")
    size = st.st_size
    if size < 8:
        raise CorruptCheckpointError(f"{path}: truncated ({size} bytes, no safetensors header)")
    n = int.from_bytes(_pread_exact(fd, 8, 0, path), "little")
    if n > min(size - 8, MAX_HEADER_BYTES):
        raise CorruptCheckpointError(f"{path}: header length {n} exceeds the file ({size} bytes)")
    body = _pread_exact(fd, n, 8, path)
    return Shard(path, fd, size, 8 + n, body)


def _match_header(shard: Shard, m: mf.Manifest, index: int, entry: mf.ShardEntry) -> None:
    where = shard.path
    if shard.size != entry.size:
        raise CorruptCheckpointError(
            f"{where}: size {shard.size} bytes, manifest says {entry.size} (truncated or replaced)"
        )
    try:
        header = json.loads(shard.header)
    except (ValueError, RecursionError) as e:  # as for the manifest (see manifest.read)
        raise CorruptCheckpointError(f"{where}: safetensors header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{where}: safetensors header is not an object")
    header.pop("__metadata__", None)
    expected = {t.name: t for t in m.tensors.values() if t.shard == index}
    if set(header) != set(expected):
        diff = sorted(set(header) ^ set(expected))[:5]
        raise CorruptCheckpointError(f"{where}: header and manifest disagree on tensors {diff}")
    data_len = shard.size - shard.data_start
    for name, t in expected.items():
        h = header[name]
        want = {
            "dtype": ST_DTYPES[dtype_from_name(t.dtype)],
            "shape": list(t.shape),
            "data_offsets": [t.start, t.stop],
        }
        if not isinstance(h, dict) or {k: h.get(k) for k in want} != want:
            raise CorruptCheckpointError(
                f"{where}: header entry of {name!r} disagrees with manifest"
            )
        if t.stop > data_len:
            raise CorruptCheckpointError(f"{where}: tensor {name!r} ends past the end of the file")


def _target_device(map_location: Any, saved: str) -> torch.device | None:
    if map_location is None:
        return torch.device(saved)
    if isinstance(map_location, dict):
        return torch.device(map_location.get(saved, saved))
    return torch.device(map_location)


def _view(buf: Any, shard: Shard, t: mf.TensorEntry) -> torch.Tensor:
    dtype = dtype_from_name(t.dtype)
    count = (t.stop - t.start) // dtype.itemsize
    if count == 0:
        return torch.empty(t.shape, dtype=dtype)
    flat = torch.frombuffer(buf, dtype=dtype, count=count, offset=shard.data_start + t.start)
    return flat.view(t.shape)


def _read(shard: Shard, t: mf.TensorEntry) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=dtype_from_name(t.dtype))
    if t.stop > t.start:
        mv = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done, offset = 0, shard.data_start + t.start
        while done < len(mv):
            n = os.preadv(shard.fd, [mv[done:]], offset + done)
            if n <= 0:
                raise CorruptCheckpointError(f"{shard.path}: truncated inside {t.name!r}")
            done += n
    return out


def _check_digest(m: mf.Manifest, t: mf.TensorEntry, tensor: torch.Tensor, where: str) -> str:
    data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else b""
    got = ck.digest(m.checksum, data)
    if got != t.checksum:
        raise CorruptCheckpointError(f"{where}: checksum mismatch in tensor {t.name!r}")
    return got


def _load_shard(ckpt: str, m: mf.Manifest, index: int, mmap: bool, verify: bool) -> dict:
    shard = open_shard(ckpt, m, index)
    try:
        buf = mmap_mod.mmap(shard.fd, 0, access=mmap_mod.ACCESS_COPY) if mmap else None
        members = sorted((t for t in m.tensors.values() if t.shard == index), key=lambda t: t.start)
        out = {t.name: (_view(buf, shard, t) if mmap else _read(shard, t)) for t in members}
        if verify and m.checksum is not None:
            digests = [_check_digest(m, t, out[t.name], shard.path) for t in members]
            if ck.shard_digest(m.checksum, _raw_header(shard), digests) != m.shards[index].checksum:
                raise CorruptCheckpointError(f"{shard.path}: shard checksum mismatch (header)")
        return out
    finally:
        shard.close()


def _raw_header(shard: Shard) -> bytes:
    return len(shard.header).to_bytes(8, "little") + shard.header


def load(path: Any, map_location: Any = "cpu", mmap: bool = True, verify: bool = False,
         workers: int = 4) -> Any:
    """Load the checkpoint at ``path``; see :func:`fastckpt.load`."""
    ckpt = resolve(path)
    m = mf.read(ckpt)
    if verify and m.checksum is None:
        raise CheckpointError(f"{ckpt}: saved without checksums; cannot verify")
    with cf.ThreadPoolExecutor(min(workers, max(1, len(m.shards)))) as pool:
        parts = pool.map(lambda i: _load_shard(ckpt, m, i, mmap, verify), range(len(m.shards)))
        stored: dict[str, torch.Tensor] = {}
        for p in parts:
            stored.update(p)
    for name, t in list(stored.items()):
        dev = _target_device(map_location, m.tensors[name].device)
        if dev is not None and dev != t.device:
            stored[name] = t.to(dev)
    return unflatten(m.tree, _resolver(m, stored))


def _resolver(m: mf.Manifest, stored: dict[str, torch.Tensor]):
    def tensor(index: int, tag: str) -> Any:
        if index >= len(m.refs):
            raise CorruptCheckpointError(f"tree refers to tensor #{index} of {len(m.refs)}")
        ref = m.refs[index]
        t = stored[ref["tensor"]]
        view = ref.get("view")
        if view is not None:
            t = t.as_strided(view["shape"], view["stride"], t.storage_offset() + view["offset"])
        return t.cpu().numpy() if tag == "$ndarray" else t

    return tensor


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`: ``ok`` is True when ``problems`` is empty."""

    path: str
    problems: list[str] = field(default_factory=list)
    nbytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _verify_shard(ckpt: str, m: mf.Manifest, index: int) -> list[str]:
    try:
        shard = open_shard(ckpt, m, index)
    except CheckpointError as e:
        return [str(e)]
    try:
        buf = mmap_mod.mmap(shard.fd, 0, access=mmap_mod.ACCESS_READ) if shard.size else b""
        mv = memoryview(buf)
        problems, digests = [], []
        members = sorted((t for t in m.tensors.values() if t.shard == index), key=lambda t: t.start)
        for t in members:
            d = ck.digest(m.checksum, mv[shard.data_start + t.start : shard.data_start + t.stop])
            digests.append(d)
            if d != t.checksum:
                problems.append(f"{shard.path}: checksum mismatch in tensor {t.name!r}")
        if ck.shard_digest(m.checksum, _raw_header(shard), digests) != m.shards[index].checksum:
            problems.append(f"{shard.path}: shard checksum mismatch")
        mv.release()
        return problems
    finally:
        shard.close()


def verify(path: Any, workers: int = 4) -> VerifyReport:
    """Check a checkpoint against its manifest: every shard present, the right size,
    headers consistent, every checksum matching. Never raises for a damaged
    checkpoint: the damage is listed in the report."""
    ckpt = resolve(path)
    report = VerifyReport(ckpt)
    try:
        m = mf.read(ckpt)
    except CheckpointError as e:
        report.problems.append(str(e))
        return report
    if m.checksum is None:
        report.problems.append(f"{ckpt}: saved without checksums; nothing to verify")
        return report
    report.nbytes = sum(s.size for s in m.shards)
    with cf.ThreadPoolExecutor(min(workers, max(1, len(m.shards)))) as pool:
        for problems in pool.map(lambda i: _verify_shard(ckpt, m, i), range(len(m.shards))):
            report.problems.extend(problems)
    return report
