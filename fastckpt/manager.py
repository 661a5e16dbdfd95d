"""``CheckpointManager``: a directory of checkpoints, one per training step, with
retention rules, best-checkpoint tracking, restore, export and import.

Everything the manager knows comes from the committed checkpoints themselves (their
manifests carry step, metrics, tags, description and time), so it agrees with the
disk after a crash, a restart or a directory deleted by hand. Old checkpoints are
removed on a background thread once a new one has committed, never on the caller's.

Under ``torch.distributed`` every rank runs a manager over the same root and the
ranks save each step together into one checkpoint. Whatever must agree across ranks
is decided by rank 0 (``dist.Consensus``), and only rank 0 changes the root: it
removes checkpoints and writes the index; the other ranks only read it.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from numbers import Integral, Real
from typing import Any

from . import commit, dist, export, reader, transfer
from .catalog import Catalog, CheckpointInfo, filed_step, read_info
from .checkpointer import Checkpointer, PathLike, SaveHandle
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    InvalidArgumentError,
    MetricError,
    StepExistsError,
)
from .restore import LoadReport
from .retention import RetentionPolicy

log = logging.getLogger("fastckpt")


class CheckpointManager:
    """Checkpoints of one training run under ``root`` (``root/step_00001000/``, ...).

    Retention (combinable; see ``docs/MANAGER.md``): ``keep_last=N`` most recent,
    ``keep_best=K`` ranked by ``metric`` with ``mode`` ``"min"`` or ``"max"``,
    ``keep_every=N`` steps and ``keep_every_seconds=T`` kept forever, and anything
    tagged ``"keep"``. The latest checkpoint is always kept. Nothing is deleted
    unless ``keep_last`` or ``keep_best`` is set.

    Saving: ``save_interval_steps=N`` saves only steps that are multiples of N;
    ``save_best_only`` saves only when ``metric`` improves on the best so far. A
    skipped save returns None; ``force=True`` overrides both.

    ``backup_dir`` keeps verified copies of the best checkpoints (the ``keep_best``
    best, or the single best) in a second directory: not ``root`` itself nor a step
    directory of it (else :class:`InvalidArgumentError`). ``checkpointer`` is the
    engine to save with (by default the manager owns one).

    ``process_group``: the ``torch.distributed`` group whose ranks manage ``root``
    together (default: the default group when torch.distributed is initialised with
    more than one rank; ``False``: this process alone). Every rank then creates the
    manager and calls ``save``, ``wait``, ``close``, the ``restore`` methods,
    ``delete``, ``import_`` and the exports collectively; rank 0 decides and alone
    changes the root. Queries (``list``, ``latest``...) are local reads. The
    group's timeout is ``checkpointer``'s ``collective_timeout``. See
    docs/MANAGER.md.

    On start, leftovers of crashed saves under ``root`` are cleaned up. Use as a
    context manager, or call :meth:`close` to wait for saves and their housekeeping.
    """

    def __init__(
        self,
        root: PathLike,
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        metric: str = "val_loss",
        mode: str = "min",
        keep_every: int | None = None,
        keep_every_seconds: float | None = None,
        save_interval_steps: int | None = None,
        save_best_only: bool = False,
        backup_dir: PathLike | None = None,
        checkpointer: Checkpointer | None = None,
        process_group: Any = None,
    ) -> None:
        self.policy = RetentionPolicy(
            keep_last, keep_best, metric, mode, keep_every, keep_every_seconds
        )
        if save_interval_steps is not None:
            _check_step(save_interval_steps, "save_interval_steps", minimum=1)
        self.save_interval_steps = save_interval_steps
        self.save_best_only = bool(save_best_only)
        group = dist.default_group() if process_group is None else process_group
        self._group = group or False  # named on every save, whatever the engine's default
        timeout = checkpointer.collective_timeout if checkpointer else dist.COLLECTIVE_TIMEOUT
        self._ranks = dist.Consensus(group or None, timeout)
        self._leader = self._ranks.rank == 0
        # Rank 0 creates and cleans the roots before any rank looks at them.
        self.root, backup = self._ranks.run("open", lambda: _open_roots(root, backup_dir))
        self._catalog = Catalog(self.root, write_index=self._leader)
        self._backups = None if backup is None else Catalog(backup, write_index=self._leader)
        self._owns_checkpointer = checkpointer is None
        self._ckpt = checkpointer or Checkpointer()
        self._lock = threading.RLock()
        # Saves (with their handles) and imports (None) in flight; see _in_flight().
        self._pending: dict[int, tuple[CheckpointInfo, SaveHandle | None]] = {}
        self._jobs: list[cf.Future] = []
        self._housekeeper = cf.ThreadPoolExecutor(1, thread_name_prefix="fastckpt-manager")
        self._closed = False
        latest = self.latest()
        log.info("%s: latest committed step %s", self.root, latest and latest.step)

    # -- saving -------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        metrics: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        description: str = "",
        force: bool = False,
        per_rank: Any = None,
    ) -> SaveHandle | None:
        """Save ``state`` as the checkpoint of ``step``, like :func:`fastckpt.save`.

        Returns the :class:`SaveHandle` once the state is snapshotted, or None when
        ``save_interval_steps`` / ``save_best_only`` skip this step. Raises
        :class:`StepExistsError` if the step is already saved (``force=True``
        replaces it, atomically) or being saved (until its handle is done), and
        :class:`MetricError` if the policy ranks by a metric missing from
        ``metrics``. Once the save commits, checkpoints the policy no longer keeps
        are removed in the background.

        Under a process group every rank calls it with the same ``step``: ``state``
        is the replicated state, ``per_rank`` this rank's own (as in
        :meth:`Checkpointer.save`). Rank 0's ``metrics``, ``tags``, ``description``
        and ``force`` decide and are recorded; an error on any rank is raised on all.
        """
        with self._lock:
            try:
                step, metrics, tags = self._check_save(step, metrics, tags)
                report: Any = step
            except CheckpointError as e:
                report = e
            if not self._ranks.settle(
                "save", report, lambda reports: self._may_save(reports, metrics, force)
            ):
                return None
            info = CheckpointInfo(
                step, self._catalog.path(step), time.time(), metrics, tags,
                str(description), 0, None,
            )
            handle = self._ckpt.save(state, info.path, metadata=_metadata(info),
                                     per_rank=per_rank, process_group=self._group)
            self._pending[step] = (info, handle)
            job: cf.Future = cf.Future()
            self._jobs = [j for j in self._jobs if not j.done()] + [job]
        handle.add_done_callback(
            lambda err: self._housekeeper.submit(self._after_save, step, handle, err, job)
        )
        return handle

    def _check_save(self, step: Any, metrics: Any, tags: Any
                    ) -> tuple[int, dict[str, Any], tuple[str, ...]]:
        """This rank's arguments to ``save``, checked."""
        step = _check_step(step, "step")
        metrics = _check_metrics(metrics)
        tags = _check_tags(tags)
        if self._closed:
            raise CheckpointError("this CheckpointManager is closed")
        self._check_metric(metrics)
        return step, metrics, tags

    def _may_save(self, reports: list, metrics: dict, force: bool) -> bool:
        """Rank 0: whether the ranks save the step they report (False: skipped);
        raises why not. ``reports`` are the ranks' steps or errors."""
        for r, rep in enumerate(reports):
            if isinstance(rep, CheckpointError):
                raise rep if len(reports) == 1 else type(rep)(f"rank {r}: {rep}")
        if len(set(reports)) > 1:
            raise InvalidArgumentError(f"the ranks save different steps: {reports}")
        step = reports[0]
        committed = self._catalog.scan()
        if not force and self._skip(step, metrics, committed):
            return False
        self._check_free(step, committed, force)
        return True

    def _check_metric(self, metrics: dict) -> None:
        if not (self.policy.keep_best or self.save_best_only):
            return
        name = self.policy.metric
        if name not in metrics:
            raise MetricError(
                f"metrics {sorted(metrics)} lack {name!r}, which this manager ranks "
                "checkpoints by (keep_best / save_best_only)"
            )
        v = metrics[name]
        if isinstance(v, bool) or not isinstance(v, Real):
            raise MetricError(f"metric {name!r} must be a real number, got {v!r}")

    def _skip(self, step: int, metrics: dict, committed: dict[int, CheckpointInfo]) -> bool:
        if self.save_interval_steps and step % self.save_interval_steps:
            return True
        if self.save_best_only:
            value = self.policy.value(metrics)
            entries = [*committed.values(), *self._in_flight().values()]
            return value is None or not self.policy.improves(value, entries)
        return False

    def _in_flight(self) -> dict[int, CheckpointInfo]:
        """Steps being saved or imported. A save counts as over once its handle is
        done, although its housekeeping only drops it from ``_pending`` later: a
        caller whose ``handle.wait()`` returned may save or delete the step at once."""
        with self._lock:
            return {step: info for step, (info, handle) in self._pending.items()
                    if handle is None or not handle.done()}

    def _check_free(self, step: int, committed: dict, force: bool) -> None:
        if step in self._in_flight():
            raise StepExistsError(f"step {step} is being saved in {self.root}")
        if step in committed and not force:
            raise StepExistsError(
                f"step {step} is already saved in {self.root}; pass force=True to replace it"
            )

    def _after_save(self, step: int, handle: SaveHandle, error: BaseException | None,
                    job: cf.Future) -> None:
        # On the housekeeping thread. A failed save deletes nothing; its error
        # reaches the caller through the handle and the next save().
        try:
            with self._lock:
                # The step may already be saved again (force=True) by a newer save.
                if self._pending.get(step, (None, None))[1] is handle:
                    del self._pending[step]
            if error is None and self._leader:
                self._prune()
                self._sync_backups()
        except Exception as e:
            log.error("housekeeping after step %d in %s failed: %s", step, self.root, e,
                      exc_info=True)
        finally:
            job.set_result(None)

    def _prune(self) -> None:
        with self._lock:
            committed = self._catalog.scan()
            keep = self.policy.keep(list(committed.values()))
            # A step being re-saved (force=True) is left to its save's atomic replace.
            busy = self._in_flight()
            doomed = [s for s in sorted(committed) if s not in keep and s not in busy]
            trash = [transfer.detach(committed[s].path) for s in doomed]
            self._catalog.scan()
        for s, t in zip(doomed, trash, strict=True):
            commit.remove_dir(t)
            log.info("removed step %d from %s (retention)", s, self.root)

    def _sync_backups(self) -> None:
        if self._backups is None:
            return
        with self._lock:
            ranked = self.policy.ranked(self._catalog.scan().values())
        want = {i.step: i for i in ranked[: self.policy.keep_best or 1]}
        have = self._backups.scan()
        for step, info in want.items():
            if step not in have or have[step].checksum != info.checksum:
                try:
                    transfer.copy_checkpoint(info.path, self._backups.path(step))
                except (CheckpointError, OSError) as e:  # e.g. deleted since the scan
                    log.warning("backup of step %d in %s failed: %s", step, self.root, e)
        for step in set(have) - set(want):
            transfer.remove_checkpoint(have[step].path)
        self._backups.scan()

    # -- queries ------------------------------------------------------------------

    def list(self) -> list[CheckpointInfo]:
        """Every committed checkpoint, oldest step first (saves in flight are not
        listed). Rescans the root, so directories removed by hand drop out."""
        with self._lock:
            infos = self._catalog.scan()
        ranked = self.policy.ranked(infos.values())
        best = ranked[0].step if ranked else None
        latest = max(infos, default=None)
        return [
            dataclasses.replace(infos[s], is_best=s == best, is_latest=s == latest)
            for s in sorted(infos)
        ]

    def latest(self) -> CheckpointInfo | None:
        """The committed checkpoint of the highest step, or None."""
        return next((i for i in self.list() if i.is_latest), None)

    def best(self) -> CheckpointInfo | None:
        """The committed checkpoint with the best ``metric``, or None when none has it
        (checkpoints without the metric, or with NaN, are never best)."""
        return next((i for i in self.list() if i.is_best), None)

    def summary(self) -> dict[str, Any]:
        """Count, total size in bytes, latest and best step of the checkpoints."""
        infos = self.list()
        return {
            "root": self.root,
            "count": len(infos),
            "total_size": sum(i.size for i in infos),
            "latest": next((i.step for i in infos if i.is_latest), None),
            "best": next((i.step for i in infos if i.is_best), None),
            "metric": self.policy.metric,
            "mode": self.policy.mode,
        }

    def compare(self, steps: Iterable[int]) -> dict[str, dict[int, Any]]:
        """Metrics side by side: ``{metric: {step: value}}`` over the given steps
        (None where a checkpoint lacks that metric)."""
        infos = [self._find(s) for s in steps]
        names = list(dict.fromkeys(k for i in infos for k in i.metrics))
        return {n: {i.step: i.metrics.get(n) for i in infos} for n in names}

    def _find(self, which: int | str) -> CheckpointInfo:
        """The committed checkpoint named by ``"latest"``, ``"best"`` or a step."""
        if which in ("latest", "best"):
            info = self.latest() if which == "latest" else self.best()
            if info is None:
                raise CheckpointNotFoundError(f"no {which} checkpoint in {self.root}")
            return info
        step = _check_step(which, "step")
        for info in self.list():
            if info.step == step:
                return info
        raise CheckpointNotFoundError(f"no committed checkpoint of step {step} in {self.root}")

    # -- restore, delete ----------------------------------------------------------

    def restore(self, which: int | str = "latest", **load_kwargs: Any) -> Any:
        """Load the checkpoint ``"latest"``, ``"best"`` or of a given step;
        ``load_kwargs`` (``map_location``, ``mmap``, ``verify``) go to
        :func:`fastckpt.load`. Under a process group the state saved as replicated,
        with sharded tensors whole, from the checkpoint rank 0 picks."""
        return self._ckpt.load(self._pick(which), **load_kwargs)

    def restore_into(self, target: Any, which: int | str = "latest", *, strict: bool = True,
                     verify: bool = False) -> LoadReport:
        """Load checkpoint ``which`` in place into ``target`` with
        :func:`fastckpt.dist.load_into`: sharded leaves (``Sharded``, ``DTensor``)
        receive this rank's block, everything else the whole saved value."""
        return dist.load_into(self._pick(which), target, strict=strict, verify=verify)

    def restore_rank_state(self, which: int | str = "latest") -> Any:
        """This rank's ``per_rank`` state from checkpoint ``which``, or None when it was
        saved by fewer ranks (:func:`fastckpt.dist.load_rank_state`)."""
        return dist.load_rank_state(self._pick(which), self._ranks.rank)

    def _pick(self, which: int | str) -> str:
        """The path of checkpoint ``which``: rank 0's choice, on every rank."""
        return self._ranks.run("restore", lambda: self._find(which).path)

    def delete(self, step: int) -> None:
        """Remove the checkpoint of ``step`` (its name disappears atomically)."""
        self._ranks.run("delete", lambda: self._delete(step))

    def _delete(self, step: int) -> None:
        with self._lock:
            if step in self._in_flight():
                raise CheckpointError(f"step {step} is being saved in {self.root}")
            trash = transfer.detach(self._find(step).path)
            self._catalog.scan()
        commit.remove_dir(trash)

    # -- copies -------------------------------------------------------------------

    def export(self, step: int | str, dest: PathLike) -> str:
        """Copy checkpoint ``step`` (or ``"latest"`` / ``"best"``) to the directory
        ``dest``, verified before it is renamed into place. Returns ``dest``."""
        return self._ranks.run(
            "export", lambda: transfer.copy_checkpoint(self._find(step).path, os.fspath(dest))
        )

    def import_(self, src: PathLike, step: int | None = None, force: bool = False
                ) -> CheckpointInfo:
        """Copy the checkpoint at ``src`` into this manager as ``step`` (by default the
        step in its metadata), verified before it appears. Retention is not applied
        to imports. Raises :class:`InvalidArgumentError` for a missing or negative
        step (before copying anything), and :class:`StepExistsError` unless the step
        is free or ``force=True``."""
        return self._ranks.run("import", lambda: self._import(src, step, force))

    def _import(self, src: PathLike, step: int | None, force: bool) -> CheckpointInfo:
        src_info = read_info(reader.resolve(os.fspath(src)))
        # Checked before anything is copied, which a bad step would leave stray.
        if step is not None:
            step = _check_step(step, "step")
        elif src_info.step is None:
            raise InvalidArgumentError(f"{src} records no step; pass step=")
        else:
            step = _check_step(src_info.step, f"the step recorded in {src}")
        with self._lock:
            self._check_free(step, self._catalog.scan(), force)
            self._pending[step] = (src_info, None)
        try:
            transfer.copy_checkpoint(src_info.path, self._catalog.path(step))
        finally:
            with self._lock:
                self._pending.pop(step, None)
        return self._find(step)

    def export_for_inference(self, step: int | str, dest: PathLike, use_ema: bool = False,
                             max_shard_size: int = 5 << 30) -> str:
        """Write checkpoint ``step``'s model weights as a Hugging Face style folder
        (``model.safetensors`` or shards plus ``model.safetensors.index.json``,
        ``training_metadata.json``, ``README.md``). The weights are
        ``state["model"]`` (``state["ema_model"]`` with ``use_ema``) as
        :class:`~fastckpt.TrainingState` saves them. Returns ``dest``."""
        return self._ranks.run("export", lambda: export.export_for_inference(
            self._find(step).path, os.fspath(dest), use_ema=use_ema,
            max_shard_size=max_shard_size,
        ))

    # -- lifecycle ----------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> None:
        """Wait until every save made so far has committed (or failed) and its
        housekeeping (removals, backups) is done; raises ``TimeoutError`` after
        ``timeout`` s. Save failures are raised by their handles, not here.

        Under a process group, every rank returns once every rank's saves and rank
        0's housekeeping are done, so that their queries then agree."""
        late = self._ranks.settle("wait", self._wait_here(timeout), sum)
        if late:
            raise TimeoutError(f"{late} saves in {self.root} still running")

    def _wait_here(self, timeout: float | None) -> int:
        """Wait for this process's saves and housekeeping; how many are still running."""
        with self._lock:
            jobs = list(self._jobs)
        return len(cf.wait(jobs, timeout=timeout).not_done)

    def close(self) -> None:
        """Wait for saves and housekeeping, then stop (closing an owned engine)."""
        self._close(agree=True)

    def _close(self, agree: bool) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if agree:
                self.wait()
            else:
                self._wait_here(None)
        finally:
            self._housekeeper.shutdown(wait=True)
            if self._owns_checkpointer:
                self._ckpt.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        # A rank leaving by an exception may be the only one leaving: it must not
        # wait for the others (they fail at their next collective call instead).
        self._close(agree=exc_type is None)


def _open_roots(root: PathLike, backup_dir: PathLike | None) -> tuple[str, str | None]:
    """Create the root (and backup root), clean up after crashed saves there, and
    return their absolute paths."""
    if backup_dir is not None:
        _check_apart(root, backup_dir)
    paths = [_open_root(d) for d in (root, backup_dir) if d is not None]
    for d in paths:
        Catalog(d).clean()
    return paths[0], paths[1] if backup_dir is not None else None


def _check_apart(root: PathLike, backup_dir: PathLike) -> None:
    """Refuse a backup directory that is the root, or a step directory of it (or the
    root one of the backup's): each directory's retention would remove the other's
    checkpoints. Other nestings are fine, as retention only touches step
    directories right below its own directory."""
    a, b = (os.path.realpath(os.fspath(d)) for d in (root, backup_dir))
    if a == b or any(os.path.dirname(x) == y and filed_step(os.path.basename(x)) is not None
                     for x, y in ((a, b), (b, a))):
        raise InvalidArgumentError(
            f"backup_dir {b} and root {a} must not be the same directory, nor one a step "
            "directory of the other"
        )


def _metadata(info: CheckpointInfo) -> dict[str, Any]:
    """What a manager records in a checkpoint's manifest."""
    return {"step": info.step, "time": info.time, "metrics": info.metrics,
            "tags": list(info.tags), "description": info.description}


def _open_root(root: PathLike) -> str:
    root = os.path.abspath(os.fspath(root))
    if os.path.lexists(root) and not os.path.isdir(root):
        raise CheckpointError(f"{root} exists and is not a directory")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {root}: {e}") from e
    return root


def _check_step(step: Any, name: str, minimum: int = 0) -> int:
    if isinstance(step, bool) or not isinstance(step, Integral) or step < minimum:
        raise InvalidArgumentError(f"{name} must be an int >= {minimum}, got {step!r}")
    return int(step)


def _check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise InvalidArgumentError(f"metrics must be a mapping of name to value, got {metrics!r}")
    metrics = dict(metrics)
    bad = [k for k in metrics if not isinstance(k, str)]
    if bad:
        raise InvalidArgumentError(f"metric names must be str, got {bad[:3]}")
    return metrics


def _check_tags(tags: Iterable[str]) -> tuple[str, ...]:
    if not isinstance(tags, Iterable):
        raise InvalidArgumentError(f"tags must be strings, got {tags!r}")
    tags = (tags,) if isinstance(tags, str) else tuple(tags)
    if not all(isinstance(t, str) for t in tags):
        raise InvalidArgumentError(f"tags must be strings, got {tags!r}")
    return tags
