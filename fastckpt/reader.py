"""Reading checkpoints: validate shards against the manifest, map or read tensors,
rebuild the object, and verify checksums.

Nothing here trusts a byte of the files: header lengths, offsets, dtypes and shapes
are checked against the file size and the manifest before any buffer is sized by
them or any memory is viewed through them.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import mmap as mmap_mod
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import checksum as ck
from . import codec, fileio
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


# Tensors a lazy reader looks up in a shard's header text before parsing it instead:
# a search costs about a hundredth of parsing the whole header.
HEADER_SEARCHES = 32


@dataclass
class Shard:
    """An open shard file, validated against its manifest entry."""

    path: str
    fd: int
    size: int
    data_start: int
    header: bytes
    checked: bool = False  # header matched against the whole manifest
    _map: Any = None
    _entries: dict | None = None
    _searches: int = 0
    entries_checked: set = field(default_factory=set)  # tensors checked by check_entry

    def has_entry(self, name: str, want: dict) -> bool:
        """Whether the header describes tensor ``name`` with the fields of ``want``.

        A lazy read of one tensor should not parse a header of thousands: the entry
        is first looked for as fastckpt writes it (compact JSON, these fields in this
        order). The search is trusted only where the name occurs once as a key
        (``"name":``, which no JSON string holds unescaped) and the entry follows
        it; anything else (a key repeated, or nested in another object) is parsed.
        So is a header that many tensors are read from: each search scans it."""
        self._searches += 1
        found = False
        if self._entries is None and self._searches <= HEADER_SEARCHES:
            key = json.dumps(name).encode() + b":"
            text = key + json.dumps(want, separators=(",", ":")).encode()
            at = self.header.find(text)
            found = at > 0 and self.header[at - 1] in b"{," and self.header.count(key) == 1
        if not found:
            h = self.entries().get(name)
            found = isinstance(h, dict) and {k: h.get(k) for k in want} == want
        return found

    def entries(self) -> dict:
        """The header's tensor entries, parsed once."""
        if self._entries is None:
            try:
                header = json.loads(self.header)
            except (ValueError, RecursionError) as e:  # as for the manifest (manifest.read)
                raise CorruptCheckpointError(
                    f"{self.path}: safetensors header is not JSON ({e})") from e
            if not isinstance(header, dict):
                raise CorruptCheckpointError(f"{self.path}: safetensors header is not an object")
            header.pop("__metadata__", None)
            self._entries = header
        return self._entries

    def mapping(self) -> mmap_mod.mmap:
        """A private (copy-on-write) mapping: tensors viewing it are writable while
        the file stays untouched."""
        if self._map is None:
            self._map = mmap_mod.mmap(self.fd, 0, access=mmap_mod.ACCESS_COPY)
        return self._map

    @property
    def raw_header(self) -> bytes:
        return len(self.header).to_bytes(8, "little") + self.header

    def close(self) -> None:
        os.close(self.fd)  # a mapping, if any, lives on as long as tensors view it


def open_shard(ckpt: str, m: mf.Manifest, index: int, full: bool = True) -> Shard:
    """Open shard ``index``, check its size and, if ``full``, its header against the
    manifest (lazy readers check each tensor's entry as they read it instead)."""
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
        if shard.size != entry.size:
            raise CorruptCheckpointError(f"{path}: size {shard.size} bytes, manifest says "
                                         f"{entry.size} (truncated or replaced)")
        if full:
            match_header(shard, m, index)
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


def match_header(shard: Shard, m: mf.Manifest, index: int) -> None:
    """Check that the shard's own header describes exactly the manifest's tensors."""
    expected = {t.name: t for t in m.shard_members(index)}
    header = shard.entries()
    if set(header) != set(expected):
        diff = sorted(set(header) ^ set(expected))[:5]
        raise CorruptCheckpointError(
            f"{shard.path}: header and manifest disagree on tensors {diff}")
    for t in expected.values():
        check_entry(shard, t)
    shard.checked = True


def check_entry(shard: Shard, t: mf.TensorEntry) -> None:
    """Check that the shard's header describes tensor ``t`` as the manifest does
    (dtype, shape, offsets) and that its bytes lie inside the file: a manifest alone
    never decides how a shard's bytes are read. Each tensor is checked once."""
    if t.name in shard.entries_checked:
        return
    want = {
        "dtype": "U8" if t.codec is not None else ST_DTYPES[t.dtype_obj],
        "shape": [t.stop - t.start] if t.codec is not None else list(t.shape),
        "data_offsets": [t.start, t.stop],
    }
    if not shard.has_entry(t.name, want):
        raise CorruptCheckpointError(
            f"{shard.path}: header entry of {t.name!r} disagrees with manifest")
    if shard.data_start + t.stop > shard.size:
        raise CorruptCheckpointError(
            f"{shard.path}: tensor {t.name!r} ends past the end of the file"
        )
    shard.entries_checked.add(t.name)


def check_map_location(map_location: Any) -> None:
    """Refuse, before anything is read, a ``map_location`` naming no device that
    tensors can go to: ``TypeError`` for a function (torch.load's storage hook has no
    counterpart here), ``ValueError`` otherwise."""
    if map_location is None:
        return
    if callable(map_location):
        raise TypeError("map_location must be a device, a device string, a dict or None, "
                        f"not {type(map_location).__name__}")
    targets = map_location.values() if isinstance(map_location, dict) else [map_location]
    for where in targets:
        try:
            dev = torch.device(where)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"map_location: {where!r} is not a device ({e})") from None
        if dev.type == "meta" or (dev.type == "cuda" and not torch.cuda.is_available()):
            raise ValueError(f"map_location: tensors cannot be loaded to {where!r} here")


def target_device(map_location: Any, saved: str) -> torch.device:
    """Where a tensor saved on device ``saved`` goes, under torch.load-like rules."""
    if map_location is None:
        return torch.device(saved)
    if isinstance(map_location, dict):
        return torch.device(map_location.get(saved, saved))
    return torch.device(map_location)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, as a writable memoryview."""
    if t.numel() == 0:
        return memoryview(bytearray())
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def read_range(shard: Shard, offset: int, buf: memoryview, threads: int = 1) -> None:
    """Fill ``buf`` from ``offset`` of the shard (the native extension when built)."""
    try:
        fileio.pread_into(shard.fd, offset, buf, threads)
    except EOFError as e:
        raise CorruptCheckpointError(f"{shard.path}: truncated: {e}") from e
    except OSError as e:
        raise CheckpointError(f"{shard.path}: read failed: {e}") from e


class CheckpointReader:
    """Lazy, random access to a checkpoint: the manifest is read on open, each shard
    is opened (and its header validated) only when one of its tensors is asked for.

    ``keys()`` are the key paths of the saved object's tensors (``"model/fc.weight"``,
    list indices and dict keys joined by ``/``); ``reader[key]`` reads just that
    tensor. ``load()`` rebuilds the whole object. Use as a context manager.
    """

    def __init__(self, path: Any, mmap: bool = True, verify: bool = False,
                 workers: int = 4, manifest: mf.Manifest | None = None) -> None:
        self.path = resolve(path)
        # A manifest may be given for a directory of safetensors files without one
        # (built from their headers, e.g. a Hugging Face model folder).
        self.manifest = manifest or mf.read(self.path, lazy=True)
        if verify and self.manifest.checksum is None:
            raise CheckpointError(f"{self.path}: saved without checksums; cannot verify")
        self.mmap, self.verify, self.workers = mmap, verify, workers
        self._shards: dict[int, Shard] = {}
        self._lock = threading.Lock()
        self._by_path: dict[str, int] | None = None
        self._ambiguous: frozenset[str] = frozenset()
        self._closed = False
        # Lazily made, shared by every shard: chunk decoders, and the tensor tasks
        # that wait on them (apart, so that no task waits on its own pool).
        self._pools: dict[str, cf.Executor] = {}

    # -- mapping interface ----------------------------------------------------

    @property
    def metadata(self) -> dict:
        """The user metadata passed to ``save(..., metadata=...)``."""
        return self.manifest.metadata

    def keys(self) -> list[str]:
        """Key paths of the saved tensors, but for :attr:`ambiguous` ones."""
        ambiguous = self.ambiguous
        return [p for p in self._paths() if p not in ambiguous]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._paths()) - len(self.ambiguous)

    def __contains__(self, key: object) -> bool:
        return key in self._paths() and key not in self.ambiguous

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._ref_tensor(self._ref_of(key))

    def _ref_of(self, key: str) -> dict:
        index = self._paths().get(key)
        if index is None:
            raise KeyError(f"{key!r} is not a tensor of {self.path}")
        if key in self.ambiguous:
            raise CheckpointError(
                f"{key!r} names several tensors of {self.path} (keys whose '/'-joined "
                "paths coincide, such as 'a/b' and 'a' -> 'b'); fastckpt.load() "
                "restores them all")
        return self.manifest.ref(index)

    def _ref_tensor(self, ref: dict) -> torch.Tensor:
        if "pieces" in ref:
            out = torch.empty(ref["shape"], dtype=dtype_from_name(ref["dtype"]))
            self._read_box(ref, [0] * out.dim(), out)
            return out
        return _apply_view(self.stored(ref["tensor"]), ref)

    def read_slice(self, key: str, offsets: list[int], out: torch.Tensor) -> None:
        """Fill ``out`` with the block of saved tensor ``key`` that starts at ``offsets``
        (one per dimension) and has ``out``'s shape, reading only the pieces (and, when
        mapped, the pages) it covers. This is how a tensor saved by some number of
        ranks is loaded resharded onto another."""
        ref = self._ref_of(key)
        if "pieces" in ref:
            self._read_box(ref, offsets, out)
        else:
            copy_box(self._ref_tensor(ref), [0] * out.dim(), out, offsets)

    def _read_box(self, ref: dict, offsets: list[int], out: torch.Tensor) -> None:
        for piece in ref["pieces"]:
            shape = self.manifest.tensor(piece["tensor"]).shape
            if _intersects(piece["offset"], shape, offsets, out.shape):
                copy_box(self.stored(piece["tensor"]), piece["offset"], out, offsets)

    @property
    def world_size(self) -> int | None:
        """How many ranks saved the checkpoint (None: a single-process save)."""
        return None if self.manifest.ranks is None else len(self.manifest.ranks)

    def rank_state(self, rank: int) -> Any:
        """The ``per_rank`` state saved by ``rank`` (docs/DISTRIBUTED.md)."""
        ranks = self.manifest.ranks
        if ranks is None or not 0 <= rank < len(ranks):
            raise KeyError(f"{self.path} holds no state of rank {rank}")

        def tensor(index: int, tag: str) -> Any:
            t = self._ref_tensor(self.manifest.ref(index))
            return t.numpy() if tag == "$ndarray" else t

        return unflatten(ranks[rank], tensor)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def spec(self, key: str) -> tuple[str, tuple[int, ...]]:
        """Dtype name and shape of tensor ``key``, from the manifest alone."""
        ref = self._ref_of(key)
        if "pieces" in ref:
            return ref["dtype"], tuple(ref["shape"])
        entry = self.manifest.tensor(ref["tensor"])
        view = ref.get("view")
        return entry.dtype, tuple(view["shape"]) if view else entry.shape

    def saved_paths(self) -> dict[str, dict]:
        """Key path -> manifest reference, for every tensor in the saved tree whose
        path names it alone (see :attr:`ambiguous`)."""
        return {p: self.manifest.ref(i) for p, i in self._paths().items()
                if p not in self.ambiguous}

    @property
    def ambiguous(self) -> frozenset[str]:
        """Key paths shared by several tensors: a dict key holding ``/`` can spell
        the path of a nested key (``{"a/b": x, "a": {"b": y}}``), as can keys of
        different types (``{0: x, "0": y}``). Reading one by path is refused, and
        :meth:`keys` leaves them out; :meth:`load` restores them all."""
        self._paths()
        return self._ambiguous

    def _paths(self) -> dict[str, int]:
        if self._by_path is None:
            paths: dict[str, int] = {}
            ambiguous = set()
            for i, p in enumerate(self.manifest.ref_paths()):
                if paths.setdefault(p, i) != i:
                    ambiguous.add(p)
            self._by_path, self._ambiguous = paths, frozenset(ambiguous)
        return self._by_path

    # -- stored tensors ---------------------------------------------------------

    def shard(self, index: int, full: bool = False) -> Shard:
        """Shard ``index``, opened once; ``full`` also matches its whole header."""
        with self._lock:
            self._check_open()
            s = self._shards.get(index)
            if s is None:
                s = self._shards[index] = open_shard(self.path, self.manifest, index, full)
            elif full and not s.checked:
                match_header(s, self.manifest, index)
            return s

    def stored(self, name: str) -> torch.Tensor:
        """The stored tensor ``name`` on the CPU: mapped or read into fresh memory;
        decoded (and its decoded bytes checked) if it was compressed."""
        t = self.manifest.tensor(name)
        return self._materialize(self.shard(t.shard), t)[0]

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Read stored tensor ``name`` straight into ``out`` (contiguous, on the CPU,
        of its dtype and shape), never holding a second copy of it."""
        t = self.manifest.tensor(name)
        self._materialize(self.shard(t.shard), t, out)

    def _materialize(self, shard: Shard, t: mf.TensorEntry, out: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, str | None]:
        """The tensor and, when verifying, the digest of its bytes on disk."""
        if not shard.checked:
            check_entry(shard, t)
        if t.codec is not None:
            return self._decode(shard, t, out)
        if out is None and self.mmap:
            out = self._view(shard, t)
        else:
            out = torch.empty(t.shape, dtype=t.dtype_obj) if out is None else out
            read_range(shard, shard.data_start + t.start, tensor_bytes(out), self.workers)
        disk = self._digest(shard, t, tensor_bytes(out), t.checksum) if self.verify else None
        return out, disk

    def _view(self, shard: Shard, t: mf.TensorEntry) -> torch.Tensor:
        dtype = t.dtype_obj
        count = (t.stop - t.start) // dtype.itemsize
        if count == 0:
            return torch.empty(t.shape, dtype=dtype)
        flat = torch.frombuffer(shard.mapping(), dtype=dtype, count=count,
                                offset=shard.data_start + t.start)
        return flat.view(t.shape)

    def _decode(self, shard: Shard, t: mf.TensorEntry, out: torch.Tensor | None
                ) -> tuple[torch.Tensor, str | None]:
        a, b = shard.data_start + t.start, shard.data_start + t.stop
        if self.mmap and out is None:
            payload = memoryview(shard.mapping())[a:b]
        else:  # a bounded, per-tensor buffer: no mapping of the whole shard stays in RSS
            payload = memoryview(bytearray(b - a))
            read_range(shard, a, payload)
        disk = self._digest(shard, t, payload, t.checksum) if self.verify else None
        out = torch.empty(t.shape, dtype=t.dtype_obj) if out is None else out
        codec.decode_into(payload, t.codec, tensor_bytes(out), key=t.name,
                          executor=self._pool("decode"))
        if self.manifest.checksum is not None:  # a codec bug must not hand back wrong values
            self._digest(shard, t, tensor_bytes(out), t.raw_checksum, "decoded ")
        return out, disk

    def _digest(self, shard: Shard, t: mf.TensorEntry, data: memoryview, want: str | None,
                what: str = "") -> str:
        got = ck.digest(self.manifest.checksum, data)
        if got != want:
            raise CorruptCheckpointError(
                f"{shard.path}: {what}checksum mismatch in tensor {t.name!r}"
            )
        return got

    def _pool(self, name: str) -> cf.Executor:
        with self._lock:
            self._check_open()
            if name not in self._pools:
                self._pools[name] = cf.ThreadPoolExecutor(
                    self.workers, thread_name_prefix=f"fastckpt-{name}")
            return self._pools[name]

    # -- whole checkpoint -------------------------------------------------------

    def load_stored(self) -> dict[str, torch.Tensor]:
        """Every stored tensor, read or mapped in parallel across shards."""
        m = self.manifest
        m.validate()
        with cf.ThreadPoolExecutor(self.workers) as pool:
            parts = pool.map(self._load_shard, range(len(m.shards)))
            out: dict[str, torch.Tensor] = {}
            for p in parts:
                out.update(p)
        return out

    def _load_shard(self, index: int) -> dict[str, torch.Tensor]:
        shard = self.shard(index, full=True)
        members = self.manifest.shard_members(index)
        hashing = self.verify and self.mmap  # then the whole mapping is read in file order
        with sequential(shard.mapping()) if hashing else contextlib.nullcontext():
            done = self._materialize_all(shard, members, in_order=hashing)
        out = {t.name: tensor for t, (tensor, _) in zip(members, done, strict=True)}
        if self.verify:
            digests = [disk for _, disk in done]
            want = self.manifest.shards[index].checksum
            if ck.shard_digest(self.manifest.checksum, shard.raw_header, digests) != want:
                raise CorruptCheckpointError(f"{shard.path}: shard checksum mismatch (header)")
        return out

    def _materialize_all(self, shard: Shard, members: list[mf.TensorEntry], in_order: bool
                         ) -> list[tuple[torch.Tensor, str | None]]:
        """:meth:`_materialize` every member, compressed ones side by side unless
        ``in_order``: most tensors hold only a few chunks, and decoding one tensor at a
        time would leave all but that many decoders idle."""
        if in_order or not any(t.codec is not None for t in members):
            return [self._materialize(shard, t) for t in members]
        if self.mmap:
            shard.mapping()  # created once here, not raced for by the threads below
        pool = self._pool("tensor")
        futures = [pool.submit(self._materialize, shard, t) if t.codec is not None
                   else None for t in members]
        try:
            return [self._materialize(shard, t) if f is None else f.result()
                    for t, f in zip(members, futures, strict=True)]
        finally:
            for f in futures:
                if f is not None:
                    f.cancel()  # after a failure: nothing left queued for this shard
            cf.wait([f for f in futures if f is not None])

    def load(self, map_location: Any = "cpu") -> Any:
        """Rebuild the saved object (see :func:`fastckpt.load`)."""
        check_map_location(map_location)
        stored = self.load_stored()
        m = self.manifest
        for name, t in list(stored.items()):
            dev = target_device(map_location, m.tensors[name].device)
            if dev != t.device:
                stored[name] = to_device(t, dev)
        return unflatten(m.tree, self._resolver(stored))

    def _resolver(self, stored: dict[str, torch.Tensor]):
        def tensor(index: int, tag: str) -> Any:
            ref = self.manifest.ref(index)
            if "pieces" in ref:
                t = _assemble(ref, stored)
            else:
                t = _apply_view(stored[ref["tensor"]], ref)
            return t.cpu().numpy() if tag == "$ndarray" else t

        return tensor

    def _check_open(self) -> None:
        # A closed reader would reopen shards and start threads that nothing closes.
        if self._closed:
            raise CheckpointError(f"{self.path}: the reader is closed")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for s in self._shards.values():
                s.close()
            self._shards.clear()
            for pool in self._pools.values():
                pool.shutdown()
            self._pools.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def sequential(mapping: mmap_mod.mmap) -> Iterator[None]:
    """Advise the kernel that ``mapping`` is about to be read once, front to back: it
    then reads ahead far enough for hashing to run at the disk's rate. The advice is
    withdrawn afterwards, since it also marks the pages as first to reclaim."""
    if hasattr(mmap_mod, "MADV_SEQUENTIAL"):
        mapping.madvise(mmap_mod.MADV_SEQUENTIAL)
        try:
            yield
        finally:
            mapping.madvise(mmap_mod.MADV_NORMAL)
    else:
        yield


def _apply_view(base: torch.Tensor, ref: dict) -> torch.Tensor:
    view = ref.get("view")
    if view is None:
        return base
    return base.as_strided(view["shape"], view["stride"], base.storage_offset() + view["offset"])


def _assemble(ref: dict, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """The whole tensor of a pieces reference, from its loaded pieces."""
    parts = [(stored[p["tensor"]], p["offset"]) for p in ref["pieces"]]
    device = parts[0][0].device if parts else "cpu"
    out = torch.empty(ref["shape"], dtype=dtype_from_name(ref["dtype"]), device=device)
    for t, offset in parts:
        copy_box(t, offset, out, [0] * out.dim())
    return out


def _intersects(a_off: list[int], a_shape: Any, b_off: list[int], b_shape: Any) -> bool:
    return all(max(a, b) < min(a + n, b + m)
               for a, n, b, m in zip(a_off, a_shape, b_off, b_shape, strict=True))


def copy_box(src: torch.Tensor, src_off: list[int], out: torch.Tensor, out_off: list[int]
             ) -> None:
    """Copy where two blocks of one global tensor overlap: ``src`` lies at ``src_off``,
    ``out`` at ``out_off`` (both in the global tensor's coordinates)."""
    for d, (a, n, b, m) in enumerate(zip(src_off, src.shape, out_off, out.shape, strict=True)):
        lo, hi = max(a, b), min(a + n, b + m)
        if lo >= hi:
            return
        src, out = src.narrow(d, lo - a, hi - lo), out.narrow(d, lo - b, hi - lo)
    out.copy_(src)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to ``device``; CUDA copies go through pinned bounce buffers
    so that reading the file overlaps the host-to-device transfer."""
    if device.type != "cuda" or t.numel() == 0:
        return t.to(device)
    return _h2d(t, device)


_BOUNCE = 64 << 20


def _h2d(src: torch.Tensor, device: torch.device) -> torch.Tensor:
    out = torch.empty(src.shape, dtype=src.dtype, device=device)
    h2d_into(src, out)
    return out


def h2d_into(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy CPU ``src`` into CUDA ``dst`` (same dtype and shape) through two pinned
    bounce buffers: filling one (which takes the mapping's page faults) overlaps the
    device copy out of the other."""
    src_b = src.contiguous().reshape(-1).view(torch.uint8)
    dst_b = dst.view(-1).view(torch.uint8)  # dst is freshly allocated or a live tensor
    stream = torch.cuda.Stream(dst.device)
    stream.wait_stream(torch.cuda.current_stream(dst.device))
    n = src_b.numel()
    bufs = [torch.empty(min(_BOUNCE, n), dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    events: list[Any] = [None, None]
    for k, a in enumerate(range(0, n, _BOUNCE)):
        b, i = min(a + _BOUNCE, n), k % 2
        if events[i] is not None:
            events[i].synchronize()  # the copy that used this buffer has finished
        bufs[i][: b - a].copy_(src_b[a:b])
        with torch.cuda.stream(stream):
            dst_b[a:b].copy_(bufs[i][: b - a], non_blocking=True)
            events[i] = torch.cuda.Event()
            events[i].record(stream)
    stream.synchronize()


def load(path: Any, map_location: Any = "cpu", mmap: bool = True, verify: bool = False,
         workers: int = 4) -> Any:
    """Load the checkpoint at ``path``; see :func:`fastckpt.load`."""
    with CheckpointReader(path, mmap=mmap, verify=verify, workers=workers) as r:
        return r.load(map_location)


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
        buf = mmap_mod.mmap(shard.fd, 0, access=mmap_mod.ACCESS_READ)
        with sequential(buf), memoryview(buf) as mv:
            problems, digests = [], []
            for t in m.shard_members(index):
                a, b = shard.data_start + t.start, shard.data_start + t.stop
                d = ck.digest(m.checksum, mv[a:b])
                digests.append(d)
                if d != t.checksum:
                    problems.append(f"{shard.path}: checksum mismatch in tensor {t.name!r}")
            if ck.shard_digest(m.checksum, shard.raw_header, digests) != m.shards[index].checksum:
                problems.append(f"{shard.path}: shard checksum mismatch")
        buf.close()
        return problems
    finally:
        shard.close()


def _tree_problems(ckpt: str, m: mf.Manifest) -> list[str]:
    """Decode the saved trees without their tensors, so that verify reports what load
    would refuse even in a manifest whose own checksum matches."""
    def reference(index: int, tag: str) -> None:
        m.ref(index)

    try:
        for tree in [m.tree, *(m.ranks or [])]:
            unflatten(tree, reference)
    except CheckpointError as e:
        return [f"{ckpt}: {e}"]
    return []


def verify(path: Any, workers: int = 4,
           progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Check a checkpoint against its manifest: every shard present, the right size,
    headers consistent, every checksum matching. Never raises for a damaged
    checkpoint: the damage is listed in the report. ``progress(nbytes)`` is called
    with each shard's size once it is checked."""
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
    report.problems += _tree_problems(ckpt, m)
    report.nbytes = sum(s.size for s in m.shards)
    with cf.ThreadPoolExecutor(min(workers, max(1, len(m.shards)))) as pool:
        for i, problems in enumerate(pool.map(lambda i: _verify_shard(ckpt, m, i),
                                              range(len(m.shards)))):
            report.problems.extend(problems)
            if progress is not None:
                progress(m.shards[i].size)
    return report
