"""fastckpt as the storage of ``torch.distributed.checkpoint`` (DCP).

``dcp.save(state, storage_writer=Writer(path))``, ``dcp.async_save(...)`` and
``dcp.load(state, storage_reader=Reader(path))``: DCP's planners decide what each
rank writes and reads (and reshard DTensors / FSDP state on load); fastckpt stages
the data, writes it on parallel threads with checksums (and optional compression)
and commits the checkpoint atomically.

How a save maps onto DCP's sequence of calls:

- ``prepare_global_plan`` (coordinator): clean up after crashed saves and create
  one hidden temporary directory beside ``path``; every rank's plan carries its name.
- ``write_data`` (every rank): this rank's items (tensor chunks, and the bytes DCP
  makes of non-tensor values) become stored tensors in shards named after the
  rank, written and fsynced into the temporary directory.
- ``finish`` (coordinator, once DCP has gathered every rank's write results, so
  every shard is durable): give the shards their global names, write the manifest
  (holding DCP's metadata as JSON) and move the directory into place.

The result is an ordinary fastckpt checkpoint: ``fastckpt.verify`` checks it, and
``fastckpt.load`` returns a flat dict of whole tensors by DCP key (non-tensor
values as the raw bytes DCP serialised them to). Nothing in it is unpickled on
load unless ``Reader(allow_pickle=True)``: see :class:`Reader`.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import io
import math
import os
import shutil
import uuid
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from . import codec, commit
from . import manifest as mf
from .checkpointer import Checkpointer
from .dist import _dtensor_type
from .errors import CheckpointError, UnsupportedTypeError
from .plan import (
    Plan,
    Stored,
    assign_shards,
    check_tensor,
    manifest_tensor,
    mark_compressed,
    shard_file_name,
)
from .reader import CheckpointReader
from .tree import Flat, dtype_from_name, dtype_name, flatten, resolve_lazy, unflatten

__all__ = ["Reader", "Writer", "decode_metadata", "encode_metadata"]

METADATA_KEY = "dcp"  # where the manifest's metadata holds DCP's metadata


@dataclasses.dataclass(frozen=True)
class _Target:
    """What the coordinator tells each rank: the shared directory and its rank."""

    directory: str
    rank: int


class Writer(StorageWriter, BlockingAsyncStager):
    """A DCP ``StorageWriter`` writing a fastckpt checkpoint at ``path``.

    Options are those of :class:`fastckpt.Checkpointer` (``workers``, ``shard_size``,
    ``checksum``, ``compression``, ``compression_level``, ``staging_budget``).
    For ``dcp.async_save`` it stages the state into CPU buffers kept across saves
    (``cache_staged_state_dict``, default True), so later saves only copy. Call
    :meth:`close` (or use it as a context manager) to stop its threads.
    """

    def __init__(self, path: str | os.PathLike, *, cache_staged_state_dict: bool = True,
                 **options: Any) -> None:
        BlockingAsyncStager.__init__(self, cache_staged_state_dict=cache_staged_state_dict)
        self.path = os.path.abspath(os.fspath(path))
        self._engine = Checkpointer(process_group=False, **options)
        self._tmp: str | None = None
        self.save_id = uuid.uuid4().hex

    # -- AsyncStager --------------------------------------------------------------------

    def stage(self, state_dict: dict) -> dict:
        """A CPU copy of ``state_dict`` for ``dcp.async_save``, into buffers kept from
        the previous save while the state's layout is unchanged (pinned only when
        CUDA is present: DCP's own stager pins unconditionally)."""
        if not self.cache_staged_state_dict:
            return super().stage(state_dict)
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        if self.state_dict_cache is not None:
            try:
                _check_layout(state_dict, self.state_dict_cache)
                return _copy_state_dict(state_dict, self.state_dict_cache)
            except (KeyError, RuntimeError, ValueError):
                pass  # the layout changed: stage into fresh buffers
        self.state_dict_cache = _create_cpu_state_dict(state_dict,
                                                       pin_memory=torch.cuda.is_available())
        return _copy_state_dict(state_dict, self.state_dict_cache)

    # -- StorageWriter ----------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = os.path.abspath(os.fspath(checkpoint_id))
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        commit.check_replaceable(self.path)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self._drop_unfinished()  # a previous save of ours that failed after this step
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        commit.recover(self.path)
        self._tmp = commit.sibling(self.path, commit.TMP_TAG)
        os.mkdir(self._tmp, 0o755)
        return [dataclasses.replace(p, storage_data=_Target(self._tmp, i))
                for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        target: _Target = plan.storage_data
        stored = [Stored(_stored_name(item.index, item.type), _resolve(planner, item))
                  for item in plan.items]
        mark_compressed(stored, codec.MIN_COMPRESS_BYTES if self._engine.compression else None)
        shards = []
        if stored:
            shards = assign_shards(stored, self._engine.shard_size,
                                   lambda k, n: f"rank{target.rank:05d}-{k:05d}.part")
        # DCP waits for write_data to finish: copies and writes may as well overlap.
        futures = self._engine.write(Plan(Flat(None), stored, [], shards), target.directory,
                                     stream=True)
        cf.wait(futures)
        written = {}
        for shard, f in zip(shards, futures, strict=True):
            r = f.result()  # a failed write raises here; DCP reports it on every rank
            info = {"file": r.file, "size": r.size, "checksum": r.checksum}
            for s in shard.stored:
                written[s.name] = {"entry": manifest_tensor(s, r.tensors[s.name]), "shard": info}
        results = [WriteResult(item.index, s.nbytes, {"tensor": s.name, **written[s.name]})
                   for item, s in zip(plan.items, stored, strict=True)]
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        if self._tmp is None:
            raise CheckpointError("finish() without prepare_global_plan()")
        doc, renames = _manifest(metadata, [r for rs in results for r in rs],
                                 self._engine.checksum)
        for a, b in renames:
            os.rename(os.path.join(self._tmp, a), os.path.join(self._tmp, b))
        commit.commit(self._tmp, self.path, doc)
        self._tmp = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    # -- lifecycle --------------------------------------------------------------------

    def _drop_unfinished(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None

    def close(self) -> None:
        """Stop the writer threads and free staging memory."""
        self._drop_unfinished()
        self._engine.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_layout(src: Any, cache: Any) -> None:
    """Raise ``ValueError`` unless ``src`` has ``cache``'s layout: the same keys and
    lengths, and tensors of the same dtype and shape (DTensors: local shape too).
    DCP's ``_copy_state_dict`` checks keys and lengths only, and its ``copy_`` would
    cast a tensor whose dtype changed into the old buffer, and broadcast one that
    shrank to the old shape, saving either without a word."""
    if isinstance(src, dict):
        if not isinstance(cache, dict) or cache.keys() != src.keys():
            raise ValueError("the state's keys changed")
        for k, v in src.items():
            _check_layout(v, cache[k])
    elif isinstance(src, (list, tuple)):
        if not isinstance(cache, (list, tuple)) or len(cache) != len(src):
            raise ValueError("the state's lists changed")
        for v, c in zip(src, cache, strict=True):
            _check_layout(v, c)
    elif isinstance(src, torch.Tensor) and (
            not isinstance(cache, torch.Tensor) or _tensor_layout(src) != _tensor_layout(cache)):
        raise ValueError("a tensor's dtype or shape changed")


def _tensor_layout(t: torch.Tensor) -> tuple:
    dtensor = _dtensor_type()
    distributed = dtensor is not None and isinstance(t, dtensor)
    return distributed, t.dtype, t.shape, (t.to_local() if distributed else t).shape


def _resolve(planner: SavePlanner, item: Any) -> torch.Tensor:
    data = planner.resolve_data(item)
    if item.type == WriteItemType.BYTE_IO:
        return torch.frombuffer(bytearray(data.getbuffer()), dtype=torch.uint8)
    check_tensor(data, item.index.fqn)
    return resolve_lazy(data.detach())


def _stored_name(index: MetadataIndex, kind: Any = WriteItemType.TENSOR) -> str:
    """A stored tensor's name: the DCP key and, for a chunk, its offsets."""
    if kind == WriteItemType.BYTE_IO or index.offset is None:
        return index.fqn
    return f"{index.fqn}@{','.join(map(str, index.offset))}"


def _manifest(md: Metadata, results: list[WriteResult], kind: str | None
              ) -> tuple[dict, list[tuple[str, str]]]:
    """The fastckpt manifest of a DCP save, and the renames giving shards global names."""
    files = sorted({r.storage_data["shard"]["file"]: r.storage_data["shard"]
                    for r in results}.items())
    renames = [(f, shard_file_name(k, len(files))) for k, (f, _) in enumerate(files)]
    number = {f: k for k, (f, _) in enumerate(files)}
    shards = [{**info, "file": new} for (_, info), (_, new) in zip(files, renames, strict=True)]
    tensors = {r.storage_data["tensor"]: {**r.storage_data["entry"],
                                          "shard": number[r.storage_data["shard"]["file"]]}
               for r in results}
    names = {r.index: r.storage_data["tensor"] for r in results}
    refs, pairs = [], []
    for fqn, item in md.state_dict_metadata.items():
        for key, ref in _refs(fqn, item, names):
            pairs.append([key, {"$tensor": len(refs)}])
            refs.append(ref)
    md.storage_data = names
    meta = flatten({METADATA_KEY: encode_metadata(md)}).tree
    return mf.document(kind, shards, tensors, refs, {"$dict": pairs}, meta), renames


def _refs(fqn: str, item: Any, names: dict) -> list[tuple[str, dict]]:
    """Tree entries for one DCP key: a whole tensor from its chunks when they tile it,
    else one entry per chunk; the bytes of a non-tensor value as they are."""
    if isinstance(item, BytesStorageMetadata):
        return [(fqn, {"tensor": names[MetadataIndex(fqn)], "path": fqn})]
    chunks = [(list(c.offsets), tuple(c.sizes), names[MetadataIndex(fqn, c.offsets)])
              for c in item.chunks]
    if mf.tiles([(o, n) for o, n, _ in chunks], list(item.size)):
        pieces = [{"tensor": name, "offset": o} for o, n, name in chunks if math.prod(n)]
        return [(fqn, {"path": fqn, "dtype": dtype_name(item.properties.dtype),
                       "shape": list(item.size), "pieces": pieces})]
    return [(name, {"tensor": name, "path": name}) for _, _, name in chunks]


# -- DCP metadata as JSON -------------------------------------------------------------------


def encode_metadata(md: Metadata) -> dict:
    """DCP's ``Metadata`` as plain JSON values (DCP's own writer pickles it)."""
    items = {}
    for fqn, item in md.state_dict_metadata.items():
        if isinstance(item, BytesStorageMetadata):
            items[fqn] = None
            continue
        p = item.properties
        if p.layout != torch.strided:
            raise UnsupportedTypeError(f"{fqn}: layout {p.layout} cannot be stored")
        items[fqn] = [dtype_name(p.dtype), p.requires_grad, p.pin_memory, list(item.size),
                      [[list(c.offsets), list(c.sizes)] for c in item.chunks]]
    sm = md.storage_meta
    return {
        "version": md.version,
        "items": items,
        "planner_data": flatten(md.planner_data).tree,
        "storage": [[i.fqn, None if i.offset is None else list(i.offset), i.index, name]
                    for i, name in md.storage_data.items()],
        "storage_meta": None if sm is None else [
            None if sm.checkpoint_id is None else os.fspath(sm.checkpoint_id),
            sm.save_id, list(sm.modules)],
    }


def decode_metadata(doc: dict) -> Metadata:
    """Inverse of :func:`encode_metadata`; a malformed document is a corrupt checkpoint."""
    try:
        items: dict[str, Any] = {}
        for fqn, v in doc["items"].items():
            if v is None:
                items[fqn] = BytesStorageMetadata()
                continue
            dtype, grad, pin, size, chunks = v
            props = TensorProperties(dtype=dtype_from_name(dtype), requires_grad=bool(grad),
                                     pin_memory=bool(pin))
            items[fqn] = TensorStorageMetadata(props, torch.Size(size), [
                ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks])
        storage = {MetadataIndex(fqn, offset, index): name
                   for fqn, offset, index, name in doc["storage"]}
        sm = doc["storage_meta"]
        meta = None if sm is None else StorageMeta(checkpoint_id=sm[0], save_id=sm[1],
                                                   modules=list(sm[2]))
        return Metadata(items, unflatten(doc["planner_data"], _no_tensor), storage, meta,
                        doc["version"])
    except (KeyError, TypeError, ValueError) as e:
        raise mf.CorruptCheckpointError(f"malformed DCP metadata: {e!r}") from e


def _no_tensor(index: int, tag: str) -> Any:
    raise mf.CorruptCheckpointError("DCP planner data refers to a tensor")


# -- reading ------------------------------------------------------------------------------


class Reader(StorageReader):
    """A DCP ``StorageReader`` for checkpoints written by :class:`Writer`.

    Tensors are read in parallel (``workers`` threads) from mapped shards straight
    into the tensors DCP's planner hands out (``verify=True`` checks checksums).

    Non-tensor values reach DCP as bytes that its planner unpickles with
    ``torch.load(weights_only=False)``. So that loading runs no code from the file,
    the Reader first requires torch's restricted ``weights_only`` unpickler to accept
    the bytes (plain containers, numbers, strings, tensors) and raises
    :class:`UnsupportedTypeError` otherwise; ``allow_pickle=True`` (only for trusted
    checkpoints) passes everything through.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = False, workers: int = 4,
                 allow_pickle: bool = False) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.verify, self.workers, self.allow_pickle = verify, workers, allow_pickle
        self.load_id = uuid.uuid4().hex
        self._reader: CheckpointReader | None = None
        self.storage_data: dict[MetadataIndex, str] = {}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = os.path.abspath(os.fspath(checkpoint_id))
        self.load_id = uuid.uuid4().hex
        self._close()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        self._close()
        self._reader = CheckpointReader(self.path, verify=self.verify, workers=self.workers)
        doc = self._reader.metadata.get(METADATA_KEY)
        if not isinstance(doc, dict):
            raise CheckpointError(f"{self.path} was not written by fastckpt.dcp.Writer")
        md = decode_metadata(doc)
        if md.storage_meta is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if self._reader is None:
            self.read_metadata()
        tensors = [r for r in plan.items if r.type == LoadItemType.TENSOR]
        with torch.no_grad(), cf.ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(lambda r: self._read_tensor(r, planner), tensors))
        for r in plan.items:
            if r.type == LoadItemType.BYTE_IO:  # planners update dicts: one at a time
                planner.load_bytes(r, io.BytesIO(self._read_bytes(r)))
        self._close()
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_tensor(self, req: Any, planner: LoadPlanner) -> None:
        src = self._reader.stored(self.storage_data[req.storage_index])
        for d, (a, n) in enumerate(zip(req.storage_offsets, req.lengths, strict=True)):
            src = src.narrow(d, a, n)
        dst = planner.resolve_tensor(req).detach()
        if dst.shape != src.shape:
            raise mf.CorruptCheckpointError(
                f"{req.storage_index.fqn}: stored block {list(src.shape)} does not fit "
                f"the requested {list(dst.shape)}")
        dst.copy_(src)
        planner.commit_tensor(req, dst)

    def _read_bytes(self, req: Any) -> bytes:
        data = self._reader.stored(self.storage_data[req.storage_index]).numpy().tobytes()
        if not self.allow_pickle:
            try:
                torch.load(io.BytesIO(data), weights_only=True)
            except Exception as e:  # noqa: BLE001 - whatever the restricted unpickler refuses
                raise UnsupportedTypeError(
                    f"{req.storage_index.fqn}: the saved value needs full unpickling, which "
                    f"could run code from the checkpoint; pass Reader(allow_pickle=True) "
                    f"if you trust {self.path} ({e})") from e
        return data

    def _close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))
