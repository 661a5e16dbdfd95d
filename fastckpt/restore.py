"""In-place restore: read a checkpoint straight into existing tensors.

``load_into`` walks the target (a module, an optimizer, or a nested dict/list of
those and tensors) with the same key paths the saved tree uses, and reads each
matching tensor's bytes from its shard directly into the target's memory: no
intermediate copy of the state is ever held in RAM.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from . import manifest as mf
from .errors import CheckpointError
from .reader import CheckpointReader, h2d_into
from .tree import dtype_from_name, flatten, unflatten


@dataclass
class LoadReport:
    """What :func:`load_into` did: keys missing from the checkpoint, keys only in the
    checkpoint, and keys whose shape or dtype differ (those were not loaded)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        parts = [f"{name}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
                 for name, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                                    ("mismatched", self.mismatched)) if keys]
        return "; ".join(parts) or f"{self.loaded} tensors loaded"


def _expand(target: Any) -> Any:
    """Replace modules and optimizers by their state dicts (whose tensors are the live
    parameters, buffers and optimizer state), keeping the nesting."""
    if isinstance(target, torch.nn.Module):
        return target.state_dict()
    if isinstance(target, torch.optim.Optimizer):
        return target.state_dict()
    if isinstance(target, dict):
        return type(target)((k, _expand(v)) for k, v in target.items())
    if isinstance(target, (list, tuple)):
        return type(target)(_expand(v) for v in target)
    return target


def load_into(path: Any, target: Any, strict: bool = True, verify: bool = False,
              workers: int = 4, regions: dict[str, tuple[list[int], list[int]]] | None = None
              ) -> LoadReport:
    """Restore the checkpoint at ``path`` (or open in a :class:`CheckpointReader`)
    into ``target`` in place.

    ``target`` mirrors the saved object: an ``nn.Module`` stands for its state dict,
    an optimizer for its ``state_dict()``, dicts and lists for themselves, e.g.
    ``load_into(path, {"model": model, "opt": optimizer})`` for a checkpoint saved as
    ``{"model": model.state_dict(), "opt": optimizer.state_dict()}``. Tensors are
    filled in parallel straight from the shards; optimizers then take their
    hyper-parameters through ``load_state_dict`` (with the already-filled tensors,
    so nothing is copied twice).

    With ``strict=True`` any missing, unexpected or mismatched (shape/dtype) key
    raises :class:`CheckpointError` listing them, before anything is modified;
    with ``strict=False`` the matching keys are loaded and the report lists the rest.

    ``regions`` maps key paths whose live tensor holds only a block of the saved one
    to ``(offsets, global_shape)``: that block is read (see
    :func:`fastckpt.dist.load_into`, which fills sharded tensors this way).
    """
    regions = regions or {}
    opened = (contextlib.nullcontext(path) if isinstance(path, CheckpointReader)
              else CheckpointReader(path, mmap=True, verify=verify, workers=workers))
    with opened as reader:
        flat = flatten(_expand(target))
        live = dict(zip(flat.paths, flat.tensors, strict=True))
        lazy = [prefix + "/state/" for prefix, _ in _optimizers(target, "")]
        report, plan = _match(reader, live, lazy, regions)
        if strict and not report.ok:
            raise CheckpointError(f"{reader.path}: checkpoint does not fit the target: {report}")
        _fill(reader, plan, workers, regions)
        report.loaded = len(plan)
        _load_optimizers(reader, target, {p: dst for p, _, dst in plan})
    return report


def _match(reader: CheckpointReader, live: dict[str, torch.Tensor], lazy: list[str],
           regions: dict) -> tuple[LoadReport, list]:
    """Pair live tensors with saved ones. Saved optimizer state under a ``lazy``
    prefix that the live optimizer has not created yet (it was never stepped) is
    not unexpected: ``load_state_dict`` creates it."""
    report, plan = LoadReport(), []
    saved = reader.saved_paths()
    for p, dst in live.items():
        ref = saved.get(p)
        if ref is None:
            report.missing.append(p)
            continue
        shape, dtype = _saved_shape(reader.manifest, ref)
        want = tuple(regions[p][1]) if p in regions else tuple(dst.shape)
        if shape != want or dtype != dst.dtype:
            report.mismatched.append(
                f"{p} (checkpoint {_fmt(dtype, shape)}, target {_fmt(dst.dtype, want)})"
            )
            continue
        plan.append((p, ref, dst))
    report.unexpected = [p for p in saved
                         if p not in live and not any(p.startswith(x) for x in lazy)]
    return report, plan


def _fmt(dtype: torch.dtype, shape: Any) -> str:
    return f"{str(dtype).replace('torch.', '')}{list(shape)}"


def _saved_shape(m: mf.Manifest, ref: dict) -> tuple[tuple[int, ...], torch.dtype]:
    if "pieces" in ref:
        return tuple(ref["shape"]), dtype_from_name(ref["dtype"])
    entry = m.tensor(ref["tensor"])
    view = ref.get("view")
    return tuple(view["shape"] if view else entry.shape), dtype_from_name(entry.dtype)


def _fill(reader: CheckpointReader, plan: list, workers: int, regions: dict) -> None:
    with torch.no_grad(), cf.ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda job: _fill_one(reader, *job, regions.get(job[0])), plan))


def _fill_one(reader: CheckpointReader, path: str, ref: dict, dst: torch.Tensor,
              region: tuple | None) -> None:
    if region is not None or "pieces" in ref:  # block by block, no whole copy in between
        reader.read_slice(path, list(region[0]) if region else [0] * dst.dim(), dst)
    elif ref.get("view") is None and dst.device.type == "cpu" and dst.is_contiguous():
        reader.read_into(ref["tensor"], dst)  # straight from the file into the live tensor
    elif dst.device.type == "cuda" and dst.is_contiguous():
        h2d_into(reader[path], dst)
    else:
        dst.copy_(reader[path])


def _load_optimizers(reader: CheckpointReader, target: Any, filled: dict) -> None:
    """Hand each optimizer its saved state dict, whose tensors are the live (already
    filled) ones wherever they matched."""
    opts = list(_optimizers(target, ""))
    if not opts:
        return

    def tensor(index: int, tag: str) -> Any:
        p = reader.manifest.ref(index).get("path", "")
        return filled[p] if p in filled else reader[p]

    saved = unflatten(reader.manifest.tree, tensor)
    for prefix, opt in opts:
        opt.load_state_dict(_subtree(saved, prefix))


def _optimizers(target: Any, prefix: str):
    if isinstance(target, torch.optim.Optimizer):
        yield prefix, target
    elif isinstance(target, dict):
        for k, v in target.items():
            yield from _optimizers(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(target, (list, tuple)):
        for i, v in enumerate(target):
            yield from _optimizers(v, f"{prefix}/{i}" if prefix else str(i))


def _subtree(obj: Any, prefix: str) -> Any:
    for part in filter(None, prefix.split("/")):
        if isinstance(obj, dict):
            key = next((k for k in obj if str(k) == part), None)
            if key is None:
                raise CheckpointError(f"checkpoint has no {prefix!r} for an optimizer")
            obj = obj[key]
        else:
            obj = obj[int(part)]
    return obj
