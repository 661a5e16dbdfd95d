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

import numpy as np
import torch

from . import manifest as mf
from .errors import CheckpointError, InvalidArgumentError
from .reader import CheckpointReader, h2d_into
from .tree import dtype_from_name, flatten, key_path, unflatten


@dataclass
class LoadReport:
    """What :func:`load_into` did: keys missing from the checkpoint, keys only in the
    checkpoint, and keys whose shape or dtype differ or whose target cannot take them
    (those were not loaded)."""

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


def _expand(target: Any, path: str = "") -> Any:
    """Replace modules and optimizers by their state dicts (whose tensors are the live
    parameters, buffers and optimizer state) and numpy arrays by tensors over their
    memory, keeping the nesting."""
    if isinstance(target, (torch.nn.Module, torch.optim.Optimizer)):
        return target.state_dict()
    if isinstance(target, np.ndarray):
        return _ndarray_target(target, path)
    if isinstance(target, dict):
        return type(target)((k, _expand(v, key_path(path, k))) for k, v in target.items())
    if isinstance(target, (list, tuple)):
        return type(target)(_expand(v, key_path(path, i)) for i, v in enumerate(target))
    return target


def _ndarray_target(a: np.ndarray, path: str) -> torch.Tensor:
    """A tensor sharing the array's memory and strides: a contiguous copy of a strided
    array would take the checkpoint's bytes instead of the caller's array."""
    where = path or "<root>"
    if not a.flags.writeable:
        raise InvalidArgumentError(f"numpy array at {where!r} is read-only")
    try:
        return torch.from_numpy(a)
    except (TypeError, ValueError) as e:  # an unsupported dtype or byte order, a negative stride
        raise InvalidArgumentError(
            f"numpy array at {where!r} cannot be filled in place: {e}") from e


def load_into(path: Any, target: Any, strict: bool = True, verify: bool = False,
              workers: int = 4, regions: dict[str, tuple[list[int], list[int]]] | None = None
              ) -> LoadReport:
    """Restore the checkpoint at ``path`` (or open in a :class:`CheckpointReader`)
    into ``target`` in place.

    ``target`` mirrors the saved object: an ``nn.Module`` stands for its state dict,
    an optimizer for its ``state_dict()``, dicts and lists for themselves, e.g.
    ``load_into(path, {"model": model, "opt": optimizer})`` for a checkpoint saved as
    ``{"model": model.state_dict(), "opt": optimizer.state_dict()}``. Tensors and numpy
    arrays (strided ones too) are filled in parallel straight from the shards; a
    read-only array raises :class:`InvalidArgumentError`. Optimizers then take their
    hyper-parameters through ``load_state_dict`` (with the already-filled tensors, so
    nothing is copied twice).

    With ``strict=True`` any missing, unexpected or mismatched (shape/dtype) key
    raises :class:`CheckpointError` listing them, before anything is modified. That
    covers optimizers: one absent from the checkpoint is missing, and one whose
    ``load_state_dict`` refuses the saved state (other parameter groups, another
    optimizer's state) is mismatched; that is tried on a copy of the optimizer first.
    A target on the meta device holds no data, so its keys are mismatched too.

    With ``strict=False`` the matching keys are loaded and the report lists the rest.
    An optimizer's state for one parameter is loaded whole or not at all: where any of
    its tensors is missing, unexpected or mismatched, or the parameter itself is a
    mismatched key of the target, the optimizer keeps its current state for that
    parameter (none, if it never stepped). An optimizer is left as it was where the
    checkpoint lacks it, where its saved state has other entries than the live one
    (another optimizer's, or one with other settings), or where it refuses that state.

    ``verify=True`` checks each tensor's bytes as they are read straight into the
    target, so when it raises :class:`CorruptCheckpointError` the corrupt tensor (and
    those read before it) may already have been written into the target.

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
        if len(live) < len(flat.paths):
            raise InvalidArgumentError(f"target tensors share key paths {_repeated(flat.paths)} "
                                       "(keys such as 'a/b' and 'a' -> 'b'): load_into "
                                       "matches tensors by key path")
        opts = list(_optimizers(target, ""))
        report, plan, unfit = _match(reader, live, _fresh_state(opts), regions)
        loads, skip = _prepare_optimizers(reader, opts, report, plan,
                                          {p: live[p] for p in unfit})
        if strict and not report.ok:
            raise CheckpointError(f"{reader.path}: checkpoint does not fit the target: {report}")
        plan = [job for job in plan if not job[0].startswith(skip)]
        _fill(reader, plan, workers, regions)
        report.loaded = len(plan)
        for opt, state in loads:
            opt.load_state_dict(state)
    return report


def _match(reader: CheckpointReader, live: dict[str, torch.Tensor], lazy: list[str],
           regions: dict) -> tuple[LoadReport, list, list[str]]:
    """Pair live tensors with saved ones; also returns the mismatched key paths.
    Saved optimizer state under a ``lazy`` prefix (a parameter the live optimizer
    holds no state for yet) is not unexpected: ``load_state_dict`` creates it."""
    report, plan, unfit = LoadReport(), [], []
    saved = reader.saved_paths()
    for p, dst in live.items():
        if p in reader.ambiguous:
            report.mismatched.append(f"{p} (several saved tensors have this key path)")
            unfit.append(p)
            continue
        ref = saved.get(p)
        if ref is None:
            report.missing.append(p)
            continue
        if dst.is_meta:  # copying into it is a no-op, so nothing would be loaded
            report.mismatched.append(f"{p} (target is on the meta device and holds no data)")
            unfit.append(p)
            continue
        shape, dtype = _saved_shape(reader.manifest, ref)
        want = tuple(regions[p][1]) if p in regions else tuple(dst.shape)
        if p in regions and not _inside(regions[p][0], dst.shape, want):
            report.mismatched.append(f"{p} (target block of {list(dst.shape)} at "
                                     f"{list(regions[p][0])} lies outside {list(want)})")
            unfit.append(p)
            continue
        if shape != want or dtype != dst.dtype:
            report.mismatched.append(
                f"{p} (checkpoint {_fmt(dtype, shape)}, target {_fmt(dst.dtype, want)})"
            )
            unfit.append(p)
            continue
        plan.append((p, ref, dst))
    lazy_prefixes = tuple(lazy)
    report.unexpected = [p for p in saved
                         if p not in live and not p.startswith(lazy_prefixes)]
    return report, plan, unfit


def _inside(offsets: Any, shape: Any, whole: tuple) -> bool:
    """Whether a block of ``shape`` at ``offsets`` lies inside a tensor of ``whole``."""
    return (len(offsets) == len(shape) == len(whole)
            and all(o >= 0 and o + n <= w for o, n, w in zip(offsets, shape, whole, strict=True)))


def _repeated(paths: list[str]) -> list[str]:
    seen: set[str] = set()
    return sorted({p for p in paths if p in seen or seen.add(p)})[:5]


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


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters in the order ``state_dict()`` numbers them."""
    return [p for group in opt.param_groups for p in group["params"]]


def _state_prefix(prefix: str, index: int) -> str:
    return f"{key_path(prefix, 'state')}/{index}/"


def _fresh_state(opts: list) -> list[str]:
    """Key path prefixes of the state of parameters their optimizer holds none for."""
    return [_state_prefix(prefix, i) for prefix, opt in opts
            for i, p in enumerate(_params(opt)) if p not in opt.state]


def _prepare_optimizers(reader: CheckpointReader, opts: list, report: LoadReport,
                        plan: list, unfit: dict[str, torch.Tensor]) -> tuple[list, tuple]:
    """Build each optimizer's state dict to load and check that it takes it, before any
    tensor is filled. Returns ``(optimizer, state dict)`` pairs and the key path
    prefixes that must stay unfilled: per-parameter state kept as it is, and whole
    optimizers that are not loaded. Problems go into ``report``."""
    if not opts:
        return [], ()
    filled = {p: dst for p, _, dst in plan}
    kept = {prefix: _kept_state(prefix, opt, report, list(filled), unfit)
            for prefix, opt in opts}
    skip = tuple(_state_prefix(prefix, i) for prefix, ids in kept.items() for i in ids or ())
    inside = tuple(key_path(prefix, "") for prefix, _ in opts)

    def tensor(index: int, tag: str) -> Any:
        p = reader.manifest.ref(index).get("path", "")
        if p in filled:
            return filled[p]
        # Read only what may be loaded: kept state is replaced by the live one below.
        return reader[p] if p.startswith(inside) and not p.startswith(skip) else None

    saved = unflatten(reader.manifest.tree, tensor)
    loads = []
    for prefix, opt in opts:
        state, problem = _optimizer_state(_subtree(saved, prefix), opt, kept[prefix])
        if problem is None:
            loads.append((opt, state))
            continue
        name = prefix or "<root>"
        if problem == "missing":
            report.missing.append(name)
        else:
            report.mismatched.append(f"{name} ({problem})")
        skip += (key_path(prefix, ""),)
    return loads, skip


def _kept_state(prefix: str, opt: torch.optim.Optimizer, report: LoadReport,
                filled: list[str], unfit: dict[str, torch.Tensor]) -> set[int] | None:
    """Indices of the parameters whose saved state is not loaded: the checkpoint has
    none for them, some of it is mismatched, or the parameter is one of the ``unfit``
    (mismatched) target tensors, so its saved state belongs to a parameter of another
    shape; only that tells a never-stepped optimizer, which has no state to compare,
    that it does not fit. None when the saved state has other entries than the live
    one: another optimizer's, or one with other settings, whose hyper-parameters
    would not suit the live state either."""
    head = key_path(prefix, "state") + "/"
    missing, unexpected = _indices(report.missing, head), _indices(report.unexpected, head)
    mismatched = _indices(list(unfit), head)
    if unexpected or missing & (mismatched | _indices(filled, head)):
        return None
    kept = missing | mismatched
    # A module's state dict holds detached views of its parameters: same memory.
    views = {(t.data_ptr(), t.shape) for t in unfit.values()}
    for i, param in enumerate(_params(opt)):
        if i not in kept and (param.data_ptr(), param.shape) in views:
            kept.add(i)
            report.mismatched.append(f"{head}{i} (state of a mismatched parameter)")
    return kept


def _indices(paths: list[str], head: str) -> set[int]:
    """The parameter indices ``i`` of the ``paths`` under ``head + "i/"``."""
    return {int(i) for p in paths if p.startswith(head)
            and (i := p[len(head):].split("/", 1)[0]).isdigit()}


_ABSENT = object()


def _optimizer_state(saved: Any, opt: torch.optim.Optimizer, kept: set[int] | None
                     ) -> tuple[Any, str | None]:
    """The state dict to load into ``opt`` (with its live state where ``kept``) and
    why it cannot be loaded, if so."""
    if saved is _ABSENT:
        return None, "missing"
    if kept is None:
        return None, "its saved state has other entries: another optimizer or settings"
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)):
        return None, "not an optimizer state dict"
    live = opt.state_dict()["state"]
    state = {i: v for i, v in saved["state"].items() if i not in kept}
    state.update((i, live[i]) for i in kept if i in live)
    saved = {**saved, "state": state}
    try:
        _probe(opt, saved)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as e:
        return None, f"the optimizer refuses the saved state: {type(e).__name__}: {e}"
    return saved, None


def _probe(opt: torch.optim.Optimizer, state: dict) -> None:
    """Run ``opt.load_state_dict(state)`` on a shallow copy of ``opt``, so that the
    optimizer's own checks (group sizes, the state keys its class needs) run while
    ``opt`` stays untouched: ``load_state_dict`` rebinds ``state`` and ``param_groups``
    to new objects rather than changing the ones the copy shares."""
    clone = object.__new__(type(opt))
    clone.__dict__.update(opt.__dict__)
    clone.load_state_dict(state)


def _optimizers(target: Any, prefix: str):
    if isinstance(target, torch.optim.Optimizer):
        yield prefix, target
    elif isinstance(target, dict):
        for k, v in target.items():
            yield from _optimizers(v, key_path(prefix, k))
    elif isinstance(target, (list, tuple)):
        for i, v in enumerate(target):
            yield from _optimizers(v, key_path(prefix, i))


def _subtree(obj: Any, prefix: str) -> Any:
    """The part of the saved object at ``prefix``, or ``_ABSENT``."""
    for part in filter(None, prefix.split("/")):
        if isinstance(obj, dict):
            obj = next((v for k, v in obj.items() if str(k) == part), _ABSENT)
        elif isinstance(obj, (list, tuple)) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return _ABSENT
    return obj
