"""Hugging Face ``transformers`` models in their own folder layout.

:func:`save_pretrained` writes what ``model.save_pretrained`` writes (``config.json``,
``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json``) through
fastckpt's pipeline: the call returns once the weights are snapshotted, the files
are written in the background with checksums, and the folder is committed
atomically with a fastckpt manifest beside HF's index. ``AutoModel.from_pretrained``
loads it as any HF folder.

:func:`load_into` restores weights in place into an existing model from such a
folder, or from any HF safetensors folder (its headers serve as the manifest), with
fastckpt's parallel reads straight into the parameters.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import torch

from .. import commit
from .. import manifest as mf
from ..checkpointer import Checkpointer, SaveHandle, SaveResult
from ..convert import INDEX_FILE, SINGLE_FILE, hf_index, index_files
from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    UnsupportedTypeError,
)
from ..plan import ST_DTYPES, Plan, Stored, assign_shards, manifest_tensor
from ..reader import MAX_HEADER_BYTES, CheckpointReader
from ..restore import LoadReport
from ..restore import load_into as _load_into
from ..tree import dtype_name, flatten

_FROM_ST = {tag: dtype_name(dt) for dt, tag in ST_DTYPES.items()}
# Commits run here, in save order, so that save() returns before the disk is done.
_committer = cf.ThreadPoolExecutor(1, thread_name_prefix="fastckpt-hf-commit")


def save_pretrained(model: Any, directory: str | os.PathLike, *,
                    max_shard_size: int = 5 * 10**9, checkpointer: Checkpointer | None = None,
                    metadata: Mapping[str, Any] | None = None) -> SaveHandle:
    """Save ``model`` (a ``transformers.PreTrainedModel``) in the HF sharded layout.

    Returns a :class:`fastckpt.SaveHandle` once the weights are snapshotted;
    ``wait()`` for the committed folder. ``directory`` is replaced as a whole (as any
    fastckpt checkpoint, and only if it is one, or empty, or missing): save
    tokenizer files after the weights. Tensors sharing storage (tied weights) are
    written once, under the first key, as HF does; ``from_pretrained`` ties them back.
    """
    from .. import default_checkpointer

    t0 = time.perf_counter()
    path = os.path.abspath(os.fspath(directory))
    engine = checkpointer or default_checkpointer()
    plan = hf_plan(model.state_dict(), max_shard_size)
    meta = flatten({"layout": "huggingface", **dict(metadata or {})})
    if meta.tensors:
        raise CheckpointError("metadata must not contain tensors")
    commit.check_replaceable(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    commit.recover(path)
    tmp = commit.sibling(path, commit.TMP_TAG)
    os.mkdir(tmp, 0o755)
    try:
        model.config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None and model.can_generate():
            generation.save_pretrained(tmp)
        futures = engine.write(plan, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stall = time.perf_counter() - t0
    fut = _committer.submit(_finish, plan, futures, tmp, path, engine.checksum, meta.tree,
                            t0, stall)
    return SaveHandle(fut, path, stall)


def hf_plan(state: Mapping[str, torch.Tensor], shard_size: int) -> Plan:
    """Plan a state dict as HF stores it: each tensor whole under its own key (HF
    files hold no views), a tensor sharing another's storage and layout once."""
    flat = flatten(state)
    stored: list[Stored] = []
    refs: list[dict] = []
    first: dict[Any, str] = {}
    for t, key in zip(flat.tensors, flat.paths, strict=True):
        if t.layout != torch.strided or t.device.type == "meta" or t.dtype not in ST_DTYPES:
            raise UnsupportedTypeError(f"{key}: {t.dtype} {t.layout} on {t.device} cannot be "
                                       "stored in safetensors")
        same = _identity(t)
        if same in first:
            refs.append({"tensor": first[same], "path": key})
            continue
        if same is not None:
            first[same] = key
        stored.append(Stored(key, t))
        refs.append({"tensor": key, "path": key})
    shards = assign_shards(stored, shard_size, lambda k, n: f"model-{k + 1:05d}-of-{n:05d}"
                                                            ".safetensors")
    return Plan(flat, stored, refs, shards)


def _identity(t: torch.Tensor) -> Any:
    """Equal for two tensors that are the same memory seen the same way (tied weights)."""
    if not t.numel():
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            t.stride(), t.dtype)


def _finish(plan: Plan, futures: list, tmp: str, path: str, kind: str | None, meta_tree: Any,
            t0: float, stall: float) -> SaveResult:
    cf.wait(futures)
    try:
        results = [f.result() for f in futures]
        weight_map = {s.name: plan.shards[s.shard].file for s in plan.stored}
        commit.write_file_durably(os.path.join(tmp, INDEX_FILE), hf_index(weight_map,
                                                                          plan.nbytes))
        written = {name: entry for r in results for name, entry in r.tensors.items()}
        doc = mf.document(
            kind, [{"file": r.file, "size": r.size, "checksum": r.checksum} for r in results],
            {s.name: manifest_tensor(s, written[s.name]) for s in plan.stored},
            plan.refs, plan.flat.tree, meta_tree)
        commit.commit(tmp, path, doc)
    except (CheckpointError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"saving {path} failed: {e}") from e
    return SaveResult(path, plan.nbytes, stall, time.perf_counter() - t0, len(plan.shards),
                      len(plan.stored))


# -- loading ------------------------------------------------------------------------------


def load_into(model: torch.nn.Module, directory: str | os.PathLike, *, strict: bool = True,
              verify: bool = False, workers: int = 4) -> LoadReport:
    """Fill ``model``'s parameters and buffers in place from an HF folder.

    The folder may be one written by :func:`save_pretrained` (checksums are then
    available to ``verify=True``) or any HF safetensors folder (single file or
    sharded with an index), whose safetensors headers are validated as a manifest.
    Tied weights the folder holds once fill every key sharing them. With
    ``strict=True`` any missing, unexpected or mismatched key raises before
    anything is modified.
    """
    path = os.path.abspath(os.fspath(directory))
    if commit.is_checkpoint(path):
        reader = CheckpointReader(path, verify=verify, workers=workers)
    else:
        if verify:
            raise CheckpointError(f"{path}: not written by fastckpt, so it has no checksums")
        reader = CheckpointReader(path, workers=workers, manifest=folder_manifest(path))
    with reader:
        return _load_into(reader, _untied(model.state_dict(), reader), strict=strict,
                          workers=workers)


def _untied(state: Mapping[str, torch.Tensor], reader: CheckpointReader) -> dict:
    """``state`` without the tied keys the folder does not hold (HF writes a group of
    tied tensors once: filling the key it kept fills them all)."""
    groups: dict[Any, list[str]] = {}
    for key, t in state.items():
        groups.setdefault(_identity(t) or key, []).append(key)
    keep = set()
    for keys in groups.values():
        held = [k for k in keys if k in reader]
        keep.update(held or keys[:1])
    return {k: t for k, t in state.items() if k in keep}


def folder_manifest(path: str) -> mf.Manifest:
    """A manifest describing an HF safetensors folder, built from its index (or its
    single ``model.safetensors``) and the files' headers, then validated like any."""
    files = index_files(path)
    if files is None:
        if not os.path.isfile(os.path.join(path, SINGLE_FILE)):
            raise CheckpointNotFoundError(f"{path}: no {INDEX_FILE} or {SINGLE_FILE}")
        files = [SINGLE_FILE]
    shards, tensors = [], {}
    for k, name in enumerate(files):
        header, size = _header(os.path.join(path, name))
        shards.append({"file": name, "size": size, "checksum": None})
        for key, h in header.items():
            if not isinstance(h, dict) or key in tensors:
                raise CorruptCheckpointError(f"{name}: bad or repeated header entry {key!r}")
            tensors[key] = {"shard": k, "dtype": _FROM_ST.get(h.get("dtype")),
                            "shape": h.get("shape"), "offsets": h.get("data_offsets"),
                            "checksum": None, "device": "cpu"}
    refs = [{"tensor": key, "path": key} for key in tensors]
    tree = {"$odict": [[key, {"$tensor": i}] for i, key in enumerate(tensors)]}
    try:
        return mf.parse(mf.document(None, shards, tensors, refs, tree, {"$dict": []}))
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{path}: {e}") from e


def _header(file: str) -> tuple[dict, int]:
    """A safetensors file's header (without ``__metadata__``) and the file's size."""
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > min(size - 8, MAX_HEADER_BYTES):
            raise CorruptCheckpointError(f"{file}: not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CorruptCheckpointError(f"{file}: header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{file}: header is not an object")
    header.pop("__metadata__", None)
    return header, size
