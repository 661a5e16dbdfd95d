"""Converting between fastckpt checkpoints and other formats.

Into fastckpt: a ``torch.save`` file (read with ``torch.load(weights_only=True)``
only, so nothing in it is ever executed) or safetensors (one file, or a folder of
them such as a Hugging Face model). Out of fastckpt: one plain safetensors file, or
a Hugging Face style folder::

    dest/
      model.safetensors                      # or, above max_shard_size:
      model-00001-of-00003.safetensors ...   #   shards plus
      model.safetensors.index.json           #   {"metadata": {"total_size"}, "weight_map"}

Exported tensor names are the checkpoint's key paths (``model/fc.weight``);
``prefix="model"`` keeps only the tensors under ``model/`` and strips it, which gives
a model's own state-dict names.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch

from . import commit, reader
from .checkpointer import Checkpointer, PathLike, SaveResult
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    InvalidArgumentError,
    UnsupportedTypeError,
)
from .plan import ST_DTYPES, encode_header, pack
from .tree import dtype_from_name

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD = 5 << 30
# progress(bytes just written, bytes the whole export writes)
Progress = Callable[[int, int], None]


def detect(path: PathLike) -> str:
    """The format at ``path``: ``"fastckpt"``, ``"safetensors"`` (a file, or a folder
    of ``*.safetensors``) or ``"torch"`` (any other file, for ``torch.load``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if commit.is_checkpoint(reader.resolve(path)):
            return "fastckpt"
        if _safetensors_files(path):
            return "safetensors"
        raise CheckpointError(f"{path}: neither a fastckpt checkpoint nor a safetensors folder")
    if not os.path.exists(path):
        if commit.is_checkpoint(reader.resolve(path)):
            return "fastckpt"
        raise CheckpointNotFoundError(f"{path}: no such file or directory")
    return "safetensors" if _is_safetensors_file(path) else "torch"


# -- into fastckpt ------------------------------------------------------------------


def import_torch(src_file: PathLike, dest_dir: PathLike, *,
                 metadata: Mapping[str, Any] | None = None,
                 checkpointer: Checkpointer | None = None,
                 compression: str | None = None) -> SaveResult:
    """Convert a ``torch.save`` file into a fastckpt checkpoint at ``dest_dir``.

    The file is read with ``torch.load(weights_only=True)`` only: it may hold
    tensors, containers and plain values, and anything else is refused with
    :class:`UnsupportedTypeError`. Blocks until the checkpoint is committed.
    ``metadata`` is stored with it, plus ``imported_from`` (the source file).
    """
    src = os.path.abspath(os.fspath(src_file))
    if not os.path.isfile(src):
        raise CheckpointNotFoundError(f"{src}: no such file")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True, mmap=_is_zip(src))
    except pickle.UnpicklingError as e:
        raise UnsupportedTypeError(
            f"{src} holds objects that torch.load(weights_only=True) refuses: {e}"
        ) from e
    # torch.load's failures on damaged or foreign files take many forms.
    except (RuntimeError, EOFError, ValueError, KeyError, AttributeError, TypeError,
            IndexError, OSError) as e:
        raise CheckpointError(f"{src} is not a readable torch.save file: {e}") from e
    return _save(obj, dest_dir, {**(metadata or {}), "imported_from": src}, checkpointer,
                 compression)


def import_safetensors(src: PathLike, dest_dir: PathLike, *,
                       metadata: Mapping[str, Any] | None = None,
                       checkpointer: Checkpointer | None = None,
                       compression: str | None = None) -> SaveResult:
    """Convert a safetensors file, or a folder of them (a Hugging Face model, sharded
    or not), into a fastckpt checkpoint at ``dest_dir`` holding the flat
    ``{name: tensor}`` dict. The files' ``__metadata__`` is kept under
    ``safetensors_metadata``. Blocks until the checkpoint is committed."""
    from safetensors import SafetensorError, safe_open

    src = os.path.abspath(os.fspath(src))
    files = _safetensors_files(src) if os.path.isdir(src) else [src]
    if not files:
        raise CheckpointNotFoundError(f"{src}: no safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    st_meta: dict[str, str] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                st_meta.update(st.metadata() or {})
                for name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if name in tensors:
                        raise CheckpointError(f"{f}: tensor {name!r} is also in another file")
                    tensors[name] = st.get_tensor(name)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file: {e}") from e
    meta = {**(metadata or {}), "imported_from": src}
    if st_meta:
        meta["safetensors_metadata"] = st_meta
    return _save(tensors, dest_dir, meta, checkpointer, compression)


def _save(obj: Any, dest: PathLike, meta: dict, checkpointer: Checkpointer | None,
          compression: str | None) -> SaveResult:
    from . import default_checkpointer  # the package imports this module first

    engine = checkpointer or default_checkpointer()
    return engine.save(obj, dest, metadata=meta, compression=compression).wait()


def _safetensors_files(folder: str) -> list[str]:
    """The files of a safetensors folder: those its HF index names, else every
    ``*.safetensors`` in it."""
    names = index_files(folder)
    if names is None:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    return [os.path.join(folder, n) for n in names]


def index_files(folder: str) -> list[str] | None:
    """The file names that ``folder``'s ``model.safetensors.index.json`` maps weights
    to, sorted; None when there is no index."""
    index = os.path.join(folder, INDEX_FILE)
    if not os.path.isfile(index):
        return None
    try:
        with open(index, "rb") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(f"{index}: not a safetensors index ({e!r})") from e
    if not all(isinstance(n, str) and n and os.path.basename(n) == n for n in names):
        raise CorruptCheckpointError(f"{index}: weight_map names files outside its folder")
    return names


def _is_safetensors_file(path: str) -> bool:
    """A safetensors file starts with an 8-byte header length and a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size


def _is_zip(path: str) -> bool:
    # torch.save's zip format can be memory-mapped; the legacy format cannot.
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


# -- out of fastckpt ----------------------------------------------------------------


def export_safetensors(src: PathLike, dest_file: PathLike, *, prefix: str | None = None,
                       progress: Progress | None = None) -> str:
    """Write the tensors of checkpoint ``src`` to one new safetensors file.

    Tensors are streamed one at a time (a compressed tensor is decoded on its own),
    so memory stays bounded by the largest tensor. Tensors that shared storage are
    written once per name, as safetensors requires. ``progress`` is called as bytes
    are written. Returns ``dest_file``.
    """
    dest = new_path(dest_file, allow_empty_dir=False)
    with reader.CheckpointReader(src) as r:
        specs = _checkpoint_specs(r, prefix)
        tmp = commit.sibling(dest, commit.TMP_TAG)
        try:
            _write_file(specs, tmp, _with_total(progress, specs))
            os.rename(tmp, dest)
        except BaseException:
            _discard(tmp)
            raise
    commit.fsync_dir(os.path.dirname(dest))
    return dest


def export_hf(src: PathLike, dest_dir: PathLike, *, prefix: str | None = None,
              max_shard_size: int = DEFAULT_MAX_SHARD,
              progress: Progress | None = None) -> str:
    """Write the tensors of checkpoint ``src`` as a Hugging Face style folder
    ``dest_dir``: ``model.safetensors``, or ``model-0000k-of-0000n.safetensors``
    files of at most ``max_shard_size`` bytes of tensors each (a larger tensor gets
    a file of its own) plus ``model.safetensors.index.json``. The folder is built
    in a temporary sibling and renamed into place when complete."""
    dest = new_path(dest_dir)
    with reader.CheckpointReader(src) as r:
        specs = _checkpoint_specs(r, prefix)
        build_folder(dest, lambda tmp: write_hf_files(tmp, specs, max_shard_size, progress))
    return dest


@dataclass(frozen=True)
class Spec:
    """One tensor to export: its name in the file, and how to get its bytes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    fetch: Callable[[], torch.Tensor]


def tensor_specs(tensors: Mapping[str, torch.Tensor]) -> list[Spec]:
    """Specs of in-memory tensors, ready for :func:`write_hf_files`."""
    return _ordered([_spec(name, t.dtype, tuple(t.shape), lambda t=t: t)
                     for name, t in tensors.items()])


def _checkpoint_specs(r: reader.CheckpointReader, prefix: str | None) -> list[Spec]:
    """What to export from a checkpoint, from the manifest alone; each tensor is read
    when written."""
    strip = f"{prefix.strip('/')}/" if prefix else ""
    out = []
    for key in r:
        if key.startswith(strip):
            dtype_name, shape = r.spec(key)
            out.append(_spec(key[len(strip):], dtype_from_name(dtype_name), shape,
                             lambda key=key: r[key]))
    if not out:
        raise CheckpointError(f"{r.path}: no tensors" + (f" under {prefix!r}" if prefix else ""))
    return _ordered(out)


def _spec(name: str, dtype: torch.dtype, shape: tuple[int, ...],
          fetch: Callable[[], torch.Tensor]) -> Spec:
    if dtype not in ST_DTYPES:
        raise CheckpointError(f"{name}: dtype {dtype} has no safetensors equivalent")
    return Spec(name, dtype, shape, math.prod(shape) * dtype.itemsize, fetch)


def _ordered(specs: list[Spec]) -> list[Spec]:
    # Widest elements first, so that every tensor starts aligned to its element size
    # (as safetensors' own writer does).
    return sorted(specs, key=lambda s: -s.dtype.itemsize)


def build_folder(dest: str, fill: Callable[[str], Any]) -> str:
    """Create the folder ``dest`` (missing or empty, see :func:`new_path`) atomically:
    ``fill(tmp)`` writes its files into a temporary sibling, which is fsynced and
    renamed into place; on failure nothing is left behind."""
    tmp = commit.sibling(dest, commit.TMP_TAG)
    try:
        os.mkdir(tmp, 0o755)
        fill(tmp)
        commit.fsync_dir(tmp)
        if os.path.isdir(dest):
            os.rmdir(dest)  # new_path allowed only an empty one
        os.rename(tmp, dest)
        commit.fsync_dir(os.path.dirname(dest))
    except OSError as e:
        _discard(tmp)
        raise CheckpointWriteError(f"writing {dest} failed: {e}") from e
    except BaseException:
        _discard(tmp)
        raise
    return dest


def write_hf_files(folder: str, specs: list[Spec], max_shard_size: int,
                   progress: Progress | None = None) -> list[str]:
    """Write ``specs`` into ``folder`` in the Hugging Face layout (see module doc);
    returns the names of the files written."""
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, Integral) \
            or max_shard_size <= 0:
        raise InvalidArgumentError(
            f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}"
        )
    groups = pack(specs, max_shard_size)
    report = _with_total(progress, specs)
    if len(groups) == 1:
        _write_file(specs, os.path.join(folder, SINGLE_FILE), report)
        return [SINGLE_FILE]
    files = [f"model-{k:05d}-of-{len(groups):05d}.safetensors" for k in range(1, len(groups) + 1)]
    for name, group in zip(files, groups, strict=True):
        _write_file(group, os.path.join(folder, name), report)
    weight_map = {s.name: name for name, group in zip(files, groups, strict=True) for s in group}
    index = hf_index(weight_map, sum(s.nbytes for s in specs))
    commit.write_file_durably(os.path.join(folder, INDEX_FILE), index)
    return [INDEX_FILE, *files]


def hf_index(weight_map: Mapping[str, str], total_size: int) -> bytes:
    """The bytes of ``model.safetensors.index.json``."""
    doc = {"metadata": {"total_size": total_size}, "weight_map": dict(weight_map)}
    return (json.dumps(doc, indent=2) + "\n").encode()


def _with_total(progress: Progress | None, specs: list[Spec]) -> Callable[[int], None] | None:
    if progress is None:
        return None
    total = sum(s.nbytes for s in specs)
    return lambda n: progress(n, total)


def _write_file(specs: list[Spec], path: str, progress: Callable[[int], None] | None) -> None:
    """One safetensors file, streamed tensor by tensor (never built in memory)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": ST_DTYPES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    with open(path, "xb") as f:
        f.write(encode_header(header))
        for s in specs:
            t = s.fetch().detach().cpu().contiguous()  # a view of shared storage: own bytes
            f.write(reader.tensor_bytes(t))
            del t  # drop the mapping (or decoded copy) before reading the next tensor
            if progress:
                progress(s.nbytes)
        f.flush()
        os.fsync(f.fileno())


def new_path(path: PathLike, allow_empty_dir: bool = True) -> str:
    """``path`` made absolute, refusing to overwrite anything (but an empty directory
    when ``allow_empty_dir``) and creating its parent."""
    path = os.path.abspath(os.fspath(path))
    empty_dir = allow_empty_dir and os.path.isdir(path) and not os.listdir(path)
    if os.path.lexists(path) and not empty_dir:
        what = "exists and is not an empty directory" if allow_empty_dir else "already exists"
        raise CheckpointError(f"{path} {what}; not overwriting it")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:  # e.g. a file where a parent directory should be
        raise CheckpointWriteError(f"cannot create the parent of {path}: {e}") from e
    return path


def _discard(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)
