"""Multi-rank checkpoints over ``torch.distributed``: one directory, one atomic commit.

Every rank of a group calls ``save`` with the same replicated state (written once,
its tensors spread over the ranks), its own ``per_rank`` state, and any sharded
tensors (:class:`Sharded` or ``DTensor``) of which it holds a block. Each rank
stages and writes its shards into one shared temporary directory; the commit round
then runs on the committer thread over a gloo group used by nothing else:

1. every rank sends rank 0 its outcome (its shards' sizes and checksums, or its
   error) once its shards are durable;
2. rank 0 checks that the ranks agree, renames the shards to their global names,
   writes the manifest and moves the directory into place (``commit.commit``);
3. rank 0 broadcasts the outcome, which every rank's handle reports.

Decisions that the ranks must share outside a save (those of a
``CheckpointManager``: which step to save, which checkpoint to load) go through a
:class:`Consensus`, on the caller's thread over a gloo group of its own.

So the checkpoint is committed only when every rank's shards are on disk, and a
rank reports success only after the commit. A rank that dies or fails makes every
rank's save fail (a dead peer closes its connections; a silent one runs into
``collective_timeout``), and the previous checkpoint stays in place. The format is
specified in docs/FORMAT.md, the API and its rules in docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import contextlib
import datetime
import heapq
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import xxhash

from . import commit, training
from . import manifest as mf
from .errors import CheckpointError, CheckpointWriteError, UnsupportedTypeError
from .plan import (
    Plan,
    Stored,
    StoredNames,
    assign_shards,
    dedupe,
    manifest_tensor,
    mark_compressed,
    shard_file_name,
)
from .reader import CheckpointReader
from .restore import LoadReport, _expand
from .restore import load_into as _load_into
from .tree import Flat, dtype_name, flatten, key_path

T = TypeVar("T")
# Seconds a rank waits for the others in a collective before giving up.
COLLECTIVE_TIMEOUT = 1800.0


def rank_prefix(rank: int) -> str:
    """Key-path prefix of a rank's ``per_rank`` tensors (``reader["@rank1/rng"]``)."""
    return f"@rank{rank}"


@dataclass(frozen=True)
class Sharded:
    """A tensor of which this rank holds one block: ``local`` lies at ``offsets`` (one
    per dimension) inside a tensor of ``global_shape``. ``write=False`` marks a block
    that another rank holds too and writes (a replica).

    Put it in the state passed to :meth:`fastckpt.Checkpointer.save` or to
    :func:`load_into`; ``DTensor`` leaves are turned into it automatically.
    """

    local: torch.Tensor
    offsets: tuple[int, ...]
    global_shape: tuple[int, ...]
    write: bool = True

    @classmethod
    def along(cls, local: torch.Tensor, dim: int, offset: int, size: int) -> Sharded:
        """The block of a tensor split along ``dim`` (global length ``size``) that
        starts at ``offset``."""
        offsets = [0] * local.dim()
        offsets[dim] = offset
        shape = list(local.shape)
        shape[dim] = size
        return cls(local, tuple(offsets), tuple(shape))

    @classmethod
    def chunk(cls, full: torch.Tensor, dim: int, rank: int, world: int) -> Sharded:
        """Rank ``rank``'s block of ``full`` split as ``torch.chunk(full, world, dim)``
        (a view: nothing is copied)."""
        step = -(-full.shape[dim] // world)
        start = min(rank * step, full.shape[dim])
        local = full.narrow(dim, start, min(step, full.shape[dim] - start))
        return cls.along(local, dim, start, full.shape[dim])


def default_group() -> Any:
    """The group a save uses when none is named: torch.distributed's default group
    when it is initialised with more than one rank, else None (this process alone)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    return torch.distributed.group.WORLD if torch.distributed.get_world_size() > 1 else None


# -- turning sharded leaves into blocks -------------------------------------------------


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def _from_dtensor(t: Any, path: str) -> Sharded:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not all(isinstance(p, (Shard, Replicate)) for p in t.placements):
        raise UnsupportedTypeError(f"DTensor at {path!r} has placements {t.placements}; "
                                   "only Shard and Replicate can be saved (redistribute first)")
    _, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    coord = t.device_mesh.get_coordinate()
    # Of the ranks holding the same block (Replicate mesh dimensions), the first writes it.
    write = all(c == 0 for c, p in zip(coord, t.placements, strict=True)
                if isinstance(p, Replicate))
    return Sharded(t.to_local(), tuple(offsets), tuple(t.shape), write)


def localize(obj: Any, path: str = "", found: dict | None = None) -> Any:
    """``obj`` with every :class:`Sharded` and ``DTensor`` leaf replaced by its local
    tensor; ``found`` collects them by key path. Containers are rebuilt as the plain
    types ``flatten`` reads them as."""
    found = {} if found is None else found
    dtensor = _dtensor_type()
    if isinstance(obj, Sharded):
        found[path] = obj
        return obj.local
    if dtensor is not None and isinstance(obj, dtensor):
        found[path] = _from_dtensor(obj, path)
        return found[path].local
    if isinstance(obj, dict):
        items = [(k, localize(v, key_path(path, k), found)) for k, v in obj.items()]
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, list):
        return [localize(v, key_path(path, i), found) for i, v in enumerate(obj)]
    if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
        return tuple(localize(v, key_path(path, i), found) for i, v in enumerate(obj))
    return obj


# -- planning one rank's part -----------------------------------------------------------


@dataclass
class RankPlan(Plan):
    """One rank's part of a save: ``stored``/``shards`` are what this rank writes;
    ``refs`` are the replicated tree's (sharded leaves filled in by rank 0)."""

    rank: int = 0
    replicated: list[Stored] = field(default_factory=list)
    pieces: dict[str, dict] = field(default_factory=dict)
    rank_tree: Any = None
    rank_refs: list[dict] = field(default_factory=list)

    def signature(self, kind: str | None) -> str:
        """Digest of everything that must be the same on every rank: the replicated
        tree and its tensors' names, dtypes and shapes, the sharded tensors' global
        shapes, the checksum kind."""
        doc = [self.flat.tree, [r for r in self.refs if r], kind,
               [[s.name, dtype_name(s.source.dtype), list(s.source.shape)]
                for s in self.replicated],
               {p: [v["shape"], v["dtype"]] for p, v in self.pieces.items()}]
        return xxhash.xxh3_64_hexdigest(mf.encode({"signature": doc}))


def plan_rank(obj: Any, per_rank: Any, rank: int, world: int, shard_size: int,
              compress_min: int | None) -> RankPlan:
    """Plan what ``rank`` writes: its share of the replicated tensors, the blocks of
    sharded tensors it holds, and its ``per_rank`` state."""
    found: dict[str, Sharded] = {}
    flat = flatten(localize(obj, "", found))
    rep = [i for i, p in enumerate(flat.paths) if p not in found]
    if len(flat.paths) - len(rep) != len(found):
        raise UnsupportedTypeError("two tensors share the key path of a sharded tensor")
    replicated, rep_refs = dedupe(Flat(None, [flat.tensors[i] for i in rep],
                                       [flat.paths[i] for i in rep]))
    refs: list[dict] = [{}] * len(flat.paths)
    for i, r in zip(rep, rep_refs, strict=True):
        refs[i] = r
    owner = _owners(replicated, world)
    mine = [s for s in replicated if owner[s.name] == rank]
    # This rank's own names (blocks, per-rank state) must not take a replicated one,
    # whichever rank writes it, nor each other's: "x@rank0" may be a key too.
    names = StoredNames(s.name for s in replicated)
    pieces = {}
    for i, p in enumerate(flat.paths):
        if p in found:
            pieces[p] = _piece(found[p], p, i, rank, mine, names)
    plan = RankPlan(flat, mine, refs, [], rank, replicated, pieces)
    if per_rank is not None:
        own = flatten(per_rank)
        paths = [key_path(rank_prefix(rank), p) for p in own.paths]
        stored, plan.rank_refs = dedupe(Flat(None, own.tensors, paths), names)
        mine.extend(stored)
        plan.rank_tree = own.tree
    mark_compressed(mine, compress_min)
    if mine:
        plan.shards = assign_shards(mine, shard_size, lambda k, n: f"rank{rank:05d}-{k:05d}.part")
    return plan


def _piece(s: Sharded, path: str, index: int, rank: int, mine: list[Stored],
           names: StoredNames) -> dict:
    if len(s.offsets) != s.local.dim() or len(s.global_shape) != s.local.dim():
        raise UnsupportedTypeError(f"sharded tensor at {path!r}: offsets and global shape "
                                   f"must have one entry per dimension of the local block")
    entry = {"index": index, "dtype": dtype_name(s.local.dtype), "shape": list(s.global_shape),
             "offset": list(s.offsets), "tensor": None}
    if s.write and s.local.numel():
        entry["tensor"] = names(f"{path}@rank{rank}")
        mine.append(Stored(entry["tensor"], s.local.detach()))
    return entry


def _owners(stored: list[Stored], world: int) -> dict[str, int]:
    """Which rank writes each replicated tensor: largest first, each to the rank with
    the fewest bytes so far. Every rank computes the same answer from the same list."""
    heap = [(0, r) for r in range(world)]
    owner = {}
    for s in sorted(stored, key=lambda s: (-s.nbytes, s.name)):
        load, r = heapq.heappop(heap)
        owner[s.name] = r
        heapq.heappush(heap, (load + s.nbytes + 1, r))  # +1: spread empty tensors too
    return owner


# -- talking to the other ranks ---------------------------------------------------------


class _Solo:
    """The trivial group of this process alone (a ``per_rank`` save without a group)."""

    rank, world = 0, 1

    def gather(self, obj: Any) -> list:
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        return obj


class _Gloo:
    """A gloo group over the ranks of ``group``, created for fastckpt alone so that its
    commit rounds never interleave with anyone else's collectives (and never wait
    behind NCCL traffic)."""

    def __init__(self, group: Any, timeout: float) -> None:
        import torch.distributed as tdist

        self._d = tdist
        ranks = tdist.get_process_group_ranks(group)
        self.group = tdist.new_group(ranks, backend="gloo",
                                     timeout=datetime.timedelta(seconds=timeout),
                                     use_local_synchronization=True)
        self.rank, self.world, self.root = tdist.get_rank(self.group), len(ranks), ranks[0]

    def gather(self, obj: Any) -> list | None:
        out = [None] * self.world if self.rank == 0 else None
        self._d.gather_object(obj, out, dst=self.root, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self._d.broadcast_object_list(box, src=self.root, group=self.group)
        return box[0]


def channel(group: Any, timeout: float) -> _Solo | _Gloo:
    """A channel for small messages among the ranks of ``group`` (None: this process
    alone). Creating one over a group is collective."""
    return _Solo() if group is None else _Gloo(group, timeout)


def _tell_lost(comm: _Solo | _Gloo, e: BaseException) -> None:
    """Rank 0, after a failed gather: tell the ranks still waiting for its broadcast,
    so that they fail at once instead of after the timeout (best effort)."""
    with contextlib.suppress(Exception):
        comm.broadcast(("error", f"rank 0 lost contact with a rank: {e}", CheckpointWriteError))


class Consensus:
    """Decisions every rank of a group must share, made once by rank 0 and told to the
    others, so that they never race. Each :meth:`settle` is collective: every rank
    makes the same calls in the same order (a call that differs fails on every rank).
    It runs on the caller's thread over a gloo group of its own (commit rounds have
    theirs); over no group (``group`` None) this process decides alone, at no cost.
    After losing contact with a rank, every later call fails at once."""

    def __init__(self, group: Any, timeout: float) -> None:
        self.comm = channel(group, timeout)
        self.rank, self.world = self.comm.rank, self.comm.world
        self.broken: str | None = None

    def run(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` run by rank 0 alone; its result, or its error, on every rank."""
        return self.settle(what, None, lambda _: fn())

    def settle(self, what: str, report: Any, decide: Callable[[list], T]) -> T:
        """Send rank 0 this rank's ``report`` on ``what``; on every rank, return what
        rank 0's ``decide(reports)`` returns, or raise what it raises (rank 0 the
        original; the others one of its class if a ``CheckpointError``, else a
        ``CheckpointError``). Results and reports must pickle."""
        if self.broken:
            raise CheckpointError(f"lost contact with the other ranks for good: {self.broken}")
        outcome, error = None, None
        try:
            reports = self.comm.gather((what, report))
        except Exception as e:  # noqa: BLE001 - a dead or silent peer
            if self.rank == 0:
                _tell_lost(self.comm, e)
            raise self._lost(what, e) from e
        if self.rank == 0:
            outcome, error = _attempt(what, reports, decide)
        try:
            outcome = self.comm.broadcast(outcome)
        except Exception as e:  # noqa: BLE001
            raise self._lost(what, e) from e
        if error is not None:
            raise error
        if outcome[0] == "error":
            raise outcome[2](outcome[1])
        return outcome[1]

    def _lost(self, what: str, e: BaseException) -> CheckpointError:
        self.broken = f"{e}"
        return CheckpointError(f"rank {self.rank}: {what}: another rank is gone or too slow: {e}")


def _attempt(what: str, reports: list, decide: Callable[[list], Any]
             ) -> tuple[tuple, BaseException | None]:
    """Rank 0: the outcome of ``decide`` to broadcast, and the error to raise here."""
    try:
        calls = [w for w, _ in reports]
        if calls != [what] * len(calls):
            raise CheckpointError(f"the ranks are out of step: they call {calls}")
        return ("ok", decide([r for _, r in reports])), None
    except Exception as e:  # noqa: BLE001 - every rank raises it
        if isinstance(e, CheckpointError):
            return ("error", str(e), type(e)), e
        return ("error", _describe(e), CheckpointError), e


class Coordinator:
    """The scope of saves made together by the ranks of one group (see the module
    docstring). Created by :class:`fastckpt.Checkpointer` on first use of a group,
    which is collective: every rank of the group must take part."""

    def __init__(self, group: Any, timeout: float, dispose: Callable[[str], Any]) -> None:
        self.comm = channel(group, timeout)
        self.dispose = dispose  # rank 0: takes a checkpoint that a commit replaced
        self.rank, self.world = self.comm.rank, self.comm.world
        # Rank 0 names the shared directory as its own, so rank 0 (which cleans up
        # after crashed saves) leaves it alone.
        self.token = self.comm.broadcast(commit.token())
        self.started = 0  # saves begun on the caller's thread
        self.rounds = 0  # commit rounds run on the committer thread
        self.broken: str | None = None

    # -- caller's thread ---------------------------------------------------------

    def start(self) -> None:
        """Count a save: it will take part in exactly one commit round."""
        self.started += 1
        if self.broken:
            raise CheckpointWriteError(f"saves with this group failed for good: {self.broken}")

    def plan(self, obj: Any, per_rank: Any, shard_size: int,
             compress_min: int | None) -> RankPlan:
        if self.world > 1:
            training.check_shared(obj)
        return plan_rank(obj, per_rank, self.rank, self.world, shard_size, compress_min)

    def make_tmp(self, path: str) -> str:
        """The shared temporary directory of this save (every rank derives the same name)."""
        if self.rank == 0:
            commit.recover(path)
        parent, name = os.path.split(path)
        tmp = os.path.join(parent, f".{name}{commit.TMP_TAG}{self.token}-{self.started}")
        try:
            os.makedirs(tmp, 0o755, exist_ok=True)
        except OSError as e:
            raise CheckpointWriteError(f"cannot create {tmp}: {e}") from e
        return tmp

    def discard(self, tmp: str) -> None:
        """Leave it: other ranks may still be writing there; rank 0 removes it once the
        commit round has failed."""

    # -- committer thread ----------------------------------------------------------

    def abandon(self, error: BaseException) -> None:
        """Take part in the round of a save that failed before it got under way."""
        if self.broken:
            return
        self.rounds += 1
        report = {"seq": self.rounds, "tmp": None, "error": _describe(error)}
        with contextlib.suppress(CheckpointError):  # the caller already has the error
            self._round(report, None, error)

    def commit(self, plan: RankPlan, futures: list, tmp: str, path: str, kind: str | None,
               meta_tree: Any) -> tuple[int, int, int]:
        """Report this rank's shards; rank 0 commits if every rank succeeded.
        Returns the whole checkpoint's (bytes, shards, tensors)."""
        self.rounds += 1
        report, error = _report(plan, futures, tmp, self.rounds, kind)

        def decide(reports: list) -> tuple:
            return _decide(reports, plan, tmp, path, kind, meta_tree, self.dispose)

        return self._round(report, decide, error)

    def _round(self, report: dict, decide: Any, error: BaseException | None) -> Any:
        try:
            reports = self.comm.gather(report)
        except Exception as e:  # noqa: BLE001 - a dead or silent peer; told below
            self._lost(e, report)
            raise CheckpointWriteError(f"rank {self.rank}: commit round failed, another rank "
                                       f"is gone or too slow: {e}") from e
        outcome = None
        if self.rank == 0:
            outcome = decide(reports) if decide else _refuse(reports, "")
        try:
            outcome = self.comm.broadcast(outcome)
        except Exception as e:  # noqa: BLE001
            self.broken = f"{e}"
            if outcome is None or outcome[0] != "ok":
                raise CheckpointWriteError(f"rank {self.rank}: no outcome from rank 0: {e}") from e
        if outcome[0] != "ok":
            raise CheckpointWriteError(outcome[1]) from error
        return outcome[1]

    def _lost(self, e: BaseException, report: dict) -> None:
        """After a failed collective the group is out of step for good: the shared
        directory is removed (by every rank, since one that came too late made it
        again after rank 0 gave up) and rank 0 tries to tell the ranks still listening."""
        self.broken = f"{e}"
        if report["tmp"]:
            shutil.rmtree(report["tmp"], ignore_errors=True)
        if self.rank == 0:
            _tell_lost(self.comm, e)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _report(plan: RankPlan, futures: list, tmp: str, seq: int, kind: str | None
            ) -> tuple[dict, BaseException | None]:
    """What this rank tells rank 0 about its part of the save."""
    report: dict[str, Any] = {"seq": seq, "tmp": tmp, "error": None}
    try:
        results = [f.result() for f in futures]
    except Exception as e:  # noqa: BLE001 - reported to every rank by rank 0
        report["error"] = _describe(e)
        return report, e
    written = {}
    for r in results:
        written.update(r.tensors)
    report.update(
        shards=[{"file": r.file, "size": r.size, "checksum": r.checksum} for r in results],
        tensors={s.name: manifest_tensor(s, written[s.name]) for s in plan.stored},
        pieces=plan.pieces, rank_tree=plan.rank_tree, rank_refs=plan.rank_refs,
        signature=plan.signature(kind), nbytes=plan.nbytes,
    )
    return report, None


def _failures(reports: list) -> str:
    bad = [f"rank {r}: {rep['error']}" for r, rep in enumerate(reports) if rep["error"]]
    return "save failed on " + "; ".join(bad)


def _refuse(reports: list, why: str) -> tuple:
    """Rank 0: give up on a save, removing what the ranks wrote."""
    for d in {rep["tmp"] for rep in reports if rep["tmp"]}:
        shutil.rmtree(d, ignore_errors=True)
    return "error", why or _failures(reports)


def _decide(reports: list, plan: RankPlan, tmp: str, path: str, kind: str | None,
            meta_tree: Any, dispose: Callable[[str], Any]) -> tuple:
    """Rank 0: merge the reports into one manifest and commit, or say why not."""
    try:
        if any(rep["error"] for rep in reports):
            raise CheckpointWriteError(_failures(reports))
        doc, renames = merge(reports, plan, kind, meta_tree)
        mf.parse(doc)  # the merged manifest must be one a reader accepts
        for a, b in renames:
            os.rename(os.path.join(tmp, a), os.path.join(tmp, b))
        commit.commit(tmp, path, doc, dispose)
    except Exception as e:  # noqa: BLE001 - every rank gets it
        return _refuse(reports, f"committing {path} failed: {e}")
    totals = (sum(rep["nbytes"] for rep in reports), len(doc["shards"]), len(doc["tensors"]))
    return "ok", totals


def merge(reports: list, plan: RankPlan, kind: str | None, meta_tree: Any
          ) -> tuple[dict, list[tuple[str, str]]]:
    """The global manifest from every rank's report, and the renames that give the
    shards their global names (rank by rank, in each rank's order)."""
    # The directory's name holds the target path and the save's number on each rank.
    if len({(rep["seq"], rep["tmp"]) for rep in reports}) != 1:
        raise CheckpointError("ranks are out of step: they are committing different saves")
    differ = [r for r, rep in enumerate(reports) if rep["signature"] != reports[0]["signature"]]
    if differ:
        raise CheckpointError(f"the replicated state differs between rank 0 and rank(s) {differ}"
                              " (pass rank-specific state as per_rank)")
    total = sum(len(rep["shards"]) for rep in reports)
    shards, renames, tensors = [], [], {}
    for rep in reports:
        base = len(shards)
        for sh in rep["shards"]:
            renames.append((sh["file"], shard_file_name(len(shards), total)))
            shards.append({**sh, "file": renames[-1][1]})
        for name, entry in rep["tensors"].items():
            if name in tensors:
                raise CheckpointError(f"tensor name {name!r} was written by two ranks")
            tensors[name] = {**entry, "shard": base + entry["shard"]}
    refs = list(plan.refs)
    for p, info in plan.pieces.items():
        pieces = [{"tensor": rep["pieces"][p]["tensor"], "offset": rep["pieces"][p]["offset"]}
                  for rep in reports if rep["pieces"][p]["tensor"]]
        refs[info["index"]] = {"path": p, "dtype": info["dtype"], "shape": info["shape"],
                               "pieces": pieces}
    ranks = []
    for rep in reports:
        ranks.append(_shift(rep["rank_tree"], len(refs)))
        refs.extend(rep["rank_refs"])
    doc = mf.document(kind, shards, tensors, refs, plan.flat.tree, meta_tree, ranks=ranks)
    return doc, renames


def _shift(tree: Any, offset: int) -> Any:
    """A tree whose tensor references point ``offset`` further into ``refs``."""
    if isinstance(tree, list):
        return [_shift(x, offset) for x in tree]
    if not isinstance(tree, dict):
        return tree
    (tag, payload), = tree.items()
    if tag in ("$tensor", "$ndarray"):
        return {tag: payload + offset}
    return {tag: _shift(payload, offset)}


# -- loading ----------------------------------------------------------------------------


def group_rank(process_group: Any = None) -> int:
    """This process's rank in ``process_group`` (the default group if None; 0 when
    torch.distributed is not initialised)."""
    group = process_group or default_group()
    return 0 if group is None else torch.distributed.get_rank(group)


def load_into(path: Any, target: Any, *, strict: bool = True, verify: bool = False,
              workers: int = 4) -> LoadReport:
    """:func:`fastckpt.load_into` for a rank of a (possibly differently sized) group.

    ``target``'s :class:`Sharded` and ``DTensor`` leaves (also inside modules' state
    dicts) receive their block of the saved tensor, whatever the number of ranks and
    the split it was saved with; every other tensor receives the whole saved tensor.
    Nothing is collective: each rank reads just what it needs.
    """
    found: dict[str, Sharded] = {}
    local = localize(_modules_to_state(target), "", found)
    regions = {p: (list(s.offsets), list(s.global_shape)) for p, s in found.items()}
    return _load_into(path, local, strict=strict, verify=verify, workers=workers,
                      regions=regions)


def _modules_to_state(target: Any) -> Any:
    """Modules become their state dicts (whose DTensors :func:`localize` can see);
    optimizers stay objects so that ``load_state_dict`` restores their settings."""
    if isinstance(target, torch.nn.Module):
        return _expand(target)
    if isinstance(target, dict):
        return type(target)((k, _modules_to_state(v)) for k, v in target.items())
    if isinstance(target, (list, tuple)) and not isinstance(target, torch.Size):
        return type(target)(_modules_to_state(v) for v in target)
    return target


def load_rank_state(path: Any, rank: int | None = None, process_group: Any = None) -> Any:
    """The ``per_rank`` state for ``rank`` (default: this process's rank in
    ``process_group``): what saved rank ``rank`` passed, or None when the checkpoint
    was saved by fewer ranks (see docs/DISTRIBUTED.md for the rule)."""
    rank = group_rank(process_group) if rank is None else rank
    with CheckpointReader(path) as reader:
        world = reader.world_size
        if world is None or rank >= world:
            return None
        return reader.rank_state(rank)
