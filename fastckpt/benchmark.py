"""Checkpoint I/O benchmark: fastckpt against the hardware's limits and its peers,
all measured in one run on the same bytes in the same directory.

The machine may be shared and noisy, so results are ratios of quantities taken
side by side, each the median of a few repetitions. A *cold* measurement drops the
files from the page cache first, so they come from the disk; a *warm* one follows
an untimed run that left them cached. Every load is *materialised*: each page of
each loaded tensor is touched, so a lazily mapped load pays for its reads too.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import gc
import json
import math
import mmap
import os
import platform
import random
import shutil
import statistics
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import __version__, fileio
from .checkpointer import Checkpointer
from .reader import CheckpointReader
from .reader import load as fastckpt_load
from .reader import verify as fastckpt_verify
from .restore import load_into

GiB = 1 << 30
PEERS = ("torch", "safetensors", "dcp")
PAGE = 4096
_CHUNK = 64 << 20  # raw I/O request size
RAW_THREADS = (1, 4)  # threads per raw request; 4 is what fastckpt's readers use
LAZY_TENSORS = 10_000  # tensors in the checkpoint opened lazily


def model_like_state(nbytes: int = GiB, seed: int = 0) -> dict:
    """A mixed-precision training state of about ``nbytes``: bf16 weights of
    transformer-like shapes plus fp32 Adam moments (10 bytes per parameter)."""
    g = torch.Generator().manual_seed(seed)
    # Narrower layers below 1 GiB, so that small states (for tests) stay small.
    hidden = 1024 if nbytes >= GiB else max(128, 1 << round(math.log2(1024 * math.sqrt(
        nbytes / GiB))))
    vocab = max(256, min(32000, nbytes // (20 * hidden)))
    shapes = [(vocab, hidden)]  # embedding
    params = vocab * hidden
    while params * 10 < nbytes:
        layer = [(3 * hidden, hidden), (hidden, hidden), (4 * hidden, hidden), (hidden, 4 * hidden),
                 (hidden,), (hidden,), (4 * hidden,)]
        shapes += layer
        params += sum(torch.Size(s).numel() for s in layer)
    model, opt_state = {}, {}
    for i, shape in enumerate(shapes):
        w = torch.randn(shape, generator=g).mul_(0.02)
        model[f"layers.{i}.weight"] = w.to(torch.bfloat16)
        opt_state[i] = {
            "step": torch.tensor(100.0),
            "exp_avg": torch.randn(shape, generator=g).mul_(1e-3),
            "exp_avg_sq": torch.rand(shape, generator=g).mul_(1e-6),
        }
    groups = [{"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1,
               "params": list(range(len(shapes)))}]
    return {"model": model, "optimizer": {"state": opt_state, "param_groups": groups},
            "step": 100, "epoch": 0}


def tensors_of(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_of(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_of(v)]
    return []


def state_bytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(obj))


def flat_state(obj: Any) -> dict[str, torch.Tensor]:
    """Flat name -> tensor view of a state, for peers that take only that."""
    out: dict[str, torch.Tensor] = {}

    def walk(o: Any, prefix: str) -> None:
        if isinstance(o, torch.Tensor):
            out[prefix] = o
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))

    walk(obj, "")
    return out


def touch(obj: Any) -> None:
    """Fault in every page of every tensor in ``obj``. One byte per page reads the
    whole page from the disk, so this materialises a mapped load while adding almost
    nothing to one that is already in memory (a full ``sum()`` would add compute time
    that no library spends and blur the comparison)."""
    for t in tensors_of(obj):
        if t.numel() == 0:
            continue
        if t.is_contiguous():
            t.reshape(-1).view(torch.uint8)[::PAGE].sum()
        else:
            t.sum()


def drop_page_cache(paths: Sequence[str]) -> str | None:
    """Evict ``paths`` (files or directories) from the page cache; returns how
    (``"drop_caches"``, ``"fadvise"``) or None when neither works here."""
    os.sync()  # only clean pages can be dropped
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1")
        return "drop_caches"
    if not hasattr(os, "posix_fadvise"):
        return None
    try:
        for p in _files(paths):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    except OSError:
        return None
    return "fadvise"


def _files(paths: Sequence[str]) -> list[str]:
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs]
        elif os.path.exists(p):
            out.append(p)
    return out


def _median_time(fn: Callable[[], Any], reps: int,
                 before: Callable[[], Any] | None = None) -> float:
    """Median seconds of ``fn()``; ``before()`` runs untimed ahead of each rep."""
    times = []
    for _ in range(reps):
        gc.collect()
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _round(variants: dict, r: int) -> list:
    """The variants' (name, value) pairs in round ``r``'s order: a different shuffle
    each round, so that no variant always runs first or after the same neighbour."""
    items = list(variants.items())
    random.Random(r).shuffle(items)
    return items


def _fsync_tree(path: str) -> None:
    for p in _files([path]):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


@dataclass
class Bench:
    """One benchmark run over ``state`` in ``workdir``."""

    state: dict
    workdir: str
    reps: int = 3
    cold_method: str | None = None

    @property
    def nbytes(self) -> int:
        return state_bytes(self.state)

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    # -- hardware limits ----------------------------------------------------------

    def memcpy(self) -> float:
        """Seconds for one ``copy_`` of every tensor into preallocated memory."""
        src = tensors_of(self.state)
        dst = [torch.empty_like(t) for t in src]

        def copy() -> None:
            for d, s in zip(dst, src, strict=True):
                d.copy_(s)

        copy()  # first touch of the destination pages is not part of a copy
        return _median_time(copy, self.reps)

    def raw_io(self) -> dict:
        """The disk's limits for the same byte count: write + fsync, and reads cold
        (from the disk; through O_DIRECT where the cache cannot be dropped) and warm,
        all in sequential 64 MiB requests. Each is measured with every request on one
        thread and split across several (a deeper queue, as the libraries use); the
        limit is the faster, so that no library can beat it merely by issuing
        parallel I/O."""
        by = {"write": {}, "write_direct": {}, "read_cold": {}, "read_warm": {}}
        path, direct = self.path("raw.bin"), self.cold_method is None
        by["write"], by["write_direct"] = self._raw_writes(path)
        for k in RAW_THREADS:
            by["read_cold"][k] = _median_time(lambda k=k: self._read_raw(path, k, direct),
                                              self.reps, lambda: self.drop([path]))
            self._read_raw(path, k)
            by["read_warm"][k] = _median_time(lambda k=k: self._read_raw(path, k), self.reps)
        os.remove(path)
        return {"raw_write_s": min(*by["write"].values(), *by["write_direct"].values()),
                "raw_read": {"cold_s": min(by["read_cold"].values()),
                             "warm_s": min(by["read_warm"].values())},
                "raw_by_threads": by}

    def raw_write(self) -> float:
        """The disk's write limit alone, as :meth:`raw_io` measures it (for the
        benchmarks that need no read limit)."""
        path = self.path("raw.bin")
        try:
            buffered, direct = self._raw_writes(path)
            return min(*buffered.values(), *direct.values())
        finally:
            os.remove(path)

    def _raw_writes(self, path: str) -> tuple[dict, dict]:
        """Median write + fsync time per thread count: through the page cache, and
        through O_DIRECT (empty where the filesystem refuses it). fastckpt writes
        either way, so the disk's limit is the faster of the two."""
        modes = [False, True] if fileio.direct_io_supported(os.path.dirname(path)) else [False]
        # Each write goes to a new file: truncating the last one would free (and, on a
        # filesystem mounted with discard, trim) its blocks inside the timed write,
        # work that no save measured here is timed with.
        by = {d: {k: _median_time(lambda k=k, d=d: self._write_raw(path, k, d), self.reps,
                                  lambda: _remove(path))
                  for k in RAW_THREADS} for d in modes}
        return by[False], by.get(True, {})

    def _write_raw(self, path: str, threads: int, direct: bool = False) -> None:
        chunk = self._chunk
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        dfd = fileio.open_direct(path, write=True) if direct else None
        try:
            offsets = range(0, self.nbytes, _CHUNK)
            if dfd is None:
                for off in offsets:
                    fileio.pwrite_all(fd, off, chunk[: min(_CHUNK, self.nbytes - off)], threads)
            else:  # requests on ``threads`` threads at once, each a whole chunk
                with cf.ThreadPoolExecutor(threads) as pool:
                    list(pool.map(lambda off: fileio.pwrite_direct(
                        dfd, off, chunk[: min(_CHUNK, self.nbytes - off)]), offsets))
            os.fsync(fd)
        finally:
            if dfd is not None:
                os.close(dfd)
            os.close(fd)

    def _read_raw(self, path: str, threads: int, direct: bool = False) -> None:
        buf = memoryview(self._buf)
        fd = fileio.open_direct(path) if direct else None
        fd = os.open(path, os.O_RDONLY) if fd is None else fd
        try:
            for off in range(0, self.nbytes, _CHUNK):
                n = min(_CHUNK, self.nbytes - off)
                if direct:
                    fileio.pread_direct_into(fd, off, buf[:n])
                else:
                    fileio.pread_into(fd, off, buf[:n], threads)
        finally:
            os.close(fd)

    @functools.cached_property
    def _chunk(self) -> memoryview:
        # An anonymous mapping is page-aligned, so O_DIRECT writes it as it is.
        chunk = memoryview(mmap.mmap(-1, _CHUNK))
        chunk[:] = bytes([7]) * _CHUNK
        return chunk

    @functools.cached_property
    def _buf(self) -> Any:
        return torch.empty(_CHUNK, dtype=torch.uint8).numpy()

    def drop(self, paths: Sequence[str]) -> None:
        self.cold_method = drop_page_cache(paths)

    # -- saves --------------------------------------------------------------------

    def fastckpt_saves(self, variants: dict[str, dict]) -> dict[str, dict]:
        """Steady-state stall and durable time of fastckpt.save with each variant's
        Checkpointer options (after one warm-up save each). The timed saves go
        round-robin over the variants, so that a disk whose speed drifts during the
        run weighs on each alike; each last checkpoint stays at ``path(name)``."""
        results: dict[str, list] = {name: [] for name in variants}
        with contextlib.ExitStack() as stack:
            engines = {name: stack.enter_context(Checkpointer(**options))
                       for name, options in variants.items()}
            for i in range(self.reps + 1):
                for name, ck in _round(engines, i):
                    path = self.path(name)
                    _remove(path)
                    gc.collect()
                    r = ck.save(self.state, path).wait()
                    if i:
                        results[name].append(r)
        return {name: {"stall_s": statistics.median(r.stall_s for r in rs),
                       "total_s": statistics.median(r.total_s for r in rs),
                       "disk_bytes": sum(os.path.getsize(p) for p in _files([self.path(name)]))}
                for name, rs in results.items()}

    def _blocking_save(self, save: Callable[[str], Any], name: str) -> float:
        """Median seconds of ``save(path)`` + fsync; the file stays for the loads. The
        previous save's output is removed untimed, as before fastckpt's saves."""
        path = self.path(name)

        def run() -> None:
            save(path)
            _fsync_tree(path)

        return _median_time(run, max(1, self.reps - 1), lambda: _remove(path))

    def torch_save(self) -> float:
        return self._blocking_save(lambda p: torch.save(self.state, p), "torch.pt")

    def safetensors_save(self) -> float:
        from safetensors.torch import save_file

        flat = flat_state(self.state)
        return self._blocking_save(lambda p: save_file(flat, p), "st.safetensors")

    def dcp_save(self) -> float:
        import torch.distributed.checkpoint as dcp

        return self._blocking_save(lambda p: dcp.save(self.state, checkpoint_id=p), "dcp")

    def dcp_async_save(self) -> dict:
        """Blocking time and durable time of torch.distributed.checkpoint.async_save."""
        import torch.distributed.checkpoint as dcp

        path = self.path("dcp-async")
        blocks, totals = [], []
        for i in range(self.reps + 1):
            _remove(path)
            gc.collect()
            t0 = time.perf_counter()
            fut = dcp.async_save(self.state, checkpoint_id=path)
            t1 = time.perf_counter()
            fut.result()
            _fsync_tree(path)
            if i:
                blocks.append(t1 - t0)
                totals.append(time.perf_counter() - t0)
        _remove(path)
        return {"stall_s": statistics.median(blocks), "total_s": statistics.median(totals)}

    # -- loads --------------------------------------------------------------------

    def loads(self, variants: dict[str, tuple[Callable[[], Any], str]]) -> dict[str, dict]:
        """Cold and warm seconds of each variant's ``fn()`` plus touching what it
        returns; the second item names the files to evict for a cold run. As for
        saves, the reps go round-robin over the variants."""
        cold: dict[str, list[float]] = {name: [] for name in variants}
        warm: dict[str, list[float]] = {name: [] for name in variants}
        # Cold reads swing most on a shared disk, and a warm mapped load takes only
        # tens of milliseconds, which a stray page-reclaim burst doubles: two more
        # reps for both medians.
        for r in range(self.reps + 2):
            for name, (fn, files) in _round(variants, r):
                cold[name].append(_median_time(lambda fn=fn: touch(fn()), 1,
                                               lambda f=files: self.drop([self.path(f)])))
        for fn, _ in variants.values():
            touch(fn())  # leaves the files cached
        for r in range(self.reps + 2):
            for name, (fn, _) in _round(variants, r):
                warm[name].append(_median_time(lambda fn=fn: touch(fn()), 1))
        return {name: {"cold_s": statistics.median(cold[name]),
                       "warm_s": statistics.median(warm[name])} for name in variants}

    def lazy_open(self, tensors: int = LAZY_TENSORS) -> dict:
        """Seconds to open a checkpoint of ``tensors`` small tensors and fetch one,
        cold (its files dropped from the page cache) and warm."""
        path = self.path("lazy")
        with Checkpointer() as c:
            c.save({f"t{i}": torch.full((8,), float(i)) for i in range(tensors)}, path).wait()

        def fetch() -> None:
            with CheckpointReader(path) as r:
                r[f"t{tensors // 3}"]

        try:
            return {"tensors": tensors,
                    "cold_s": _median_time(fetch, self.reps + 2, lambda: self.drop([path])),
                    "warm_s": _median_time(fetch, self.reps)}
        finally:
            _remove(path)

    def load_variants(self, peers: Sequence[str]) -> dict[str, tuple[Callable[[], Any], str]]:
        """fastckpt's loads and the peers' ones, for :meth:`loads`."""
        p, pz = self.path("fastckpt"), self.path("fastckpt_zstd")

        def fallback_read() -> Any:
            with _env("FASTCKPT_NO_NATIVE", "1"):  # read at call time by fileio
                return fastckpt_load(p, mmap=False)

        def load_into_state() -> dict:
            load_into(p, self.state)  # the same values: the state is left as it was
            return self.state

        out = {
            "fastckpt_mmap": (lambda: fastckpt_load(p), "fastckpt"),
            "fastckpt_verified": (lambda: fastckpt_load(p, verify=True), "fastckpt"),
            "fastckpt_read": (lambda: fastckpt_load(p, mmap=False), "fastckpt"),
            "fastckpt_read_fallback": (fallback_read, "fastckpt"),
            "fastckpt_zstd": (lambda: fastckpt_load(pz), "fastckpt_zstd"),
            "load_into": (load_into_state, "fastckpt"),
            "verify": (lambda: _check(fastckpt_verify(p)), "fastckpt"),
        }
        if "torch" in peers:
            pt = self.path("torch.pt")
            out["torch_load"] = (lambda: torch.load(pt, weights_only=True), "torch.pt")
            out["torch_load_mmap"] = (lambda: torch.load(pt, weights_only=True, mmap=True),
                                      "torch.pt")
        if "safetensors" in peers:
            from safetensors.torch import load_file

            st = self.path("st.safetensors")
            out["safetensors_load"] = (lambda: load_file(st), "st.safetensors")
        if "dcp" in peers:
            import torch.distributed.checkpoint as dcp

            def dcp_load() -> dict:
                dcp.load(self.state, checkpoint_id=self.path("dcp"))
                return self.state

            out["dcp_load"] = (dcp_load, "dcp")
        return out


def _check(report: Any) -> None:
    if not report.ok:
        raise RuntimeError(f"benchmark checkpoint does not verify: {report.problems[:3]}")


# -- a training loop that checkpoints ------------------------------------------------


@dataclass
class TrainLoop:
    """A small transformer trained on CPU with a checkpoint every ``every`` steps:
    what each way of checkpointing costs the training loop."""

    workdir: str
    steps: int = 30
    every: int = 5

    def _setup(self) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]:
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(d_model=512, nhead=8, dim_feedforward=2048,
                                                 dropout=0.0, batch_first=True)
        model = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return model, opt, torch.randn(4, 64, 512)  # ~0.15 s a step on 2 cores

    @staticmethod
    def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        opt.step()

    def run(self, variant: str) -> dict:
        """Train ``steps`` steps checkpointing with ``variant`` (``"none"``,
        ``"fastckpt"``, ``"fastckpt_page_cache"``, ``"torch"``, ``"dcp"``): loop
        seconds, the median time a checkpoint blocked the loop, and the wait for saves
        still running at the end."""
        model, opt, x = self._setup()
        for _ in range(2):  # warm-up: first-call costs, and the optimizer state
            self._step(model, opt, x)
        ckpt, pending, stalls, steps = _Saver(variant, self.workdir), None, [], []
        t0 = time.perf_counter()
        for i in range(1, self.steps + 1):
            s0 = time.perf_counter()
            self._step(model, opt, x)
            steps.append(time.perf_counter() - s0)
            if variant != "none" and i % self.every == 0:
                state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": i}
                s0 = time.perf_counter()
                pending = ckpt.save(state, i, pending)
                stalls.append(time.perf_counter() - s0)
        loop = time.perf_counter() - t0
        d0 = time.perf_counter()
        ckpt.finish(pending)
        nbytes = state_bytes({"m": model.state_dict(), "o": opt.state_dict()})
        return {"loop_s": loop, "step_s": loop / self.steps,
                "median_step_s": statistics.median(steps), "drain_s": time.perf_counter() - d0,
                "stall_s": statistics.median(stalls) if stalls else 0.0,
                "checkpoints": len(stalls), "state_bytes": nbytes}


class _Saver:
    """One way of checkpointing inside the training loop. Each checkpoint goes to a
    new path, as training does; the directory is emptied at the end."""

    def __init__(self, variant: str, workdir: str) -> None:
        self.variant = variant
        self.dir = tempfile.mkdtemp(prefix=f"train-{variant}-", dir=workdir)
        self.engine = None
        if variant.startswith("fastckpt"):
            self.engine = Checkpointer(direct_io=variant != "fastckpt_page_cache")

    def save(self, state: dict, step: int, pending: Any) -> Any:
        path = os.path.join(self.dir, f"step_{step}")
        if self.engine is not None:
            return self.engine.save(state, path)  # back-pressure is the engine's own
        if self.variant == "torch":
            torch.save(state, path)
            _fsync_tree(path)  # durable, as the other two are when they complete
            return None
        import torch.distributed.checkpoint as dcp

        if pending is not None:
            pending.result()  # DCP allows one async save in flight
        return dcp.async_save(state, checkpoint_id=path)

    def finish(self, pending: Any) -> None:
        if self.engine is not None:
            self.engine.close()
        elif pending is not None:
            pending.result()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_training(workdir: str, steps: int, rounds: int, peers: Sequence[str],
                 log: Callable[[str], None]) -> dict:
    """The training loop with each way of checkpointing, in ``rounds`` interleaved
    rounds (a burst of load from elsewhere then hits one round of every variant, not
    all of one); each figure is the median over the rounds."""
    loop = TrainLoop(workdir, steps, max(1, steps // 6))
    # fastckpt_page_cache: direct_io=False, to show what writing around the page
    # cache spares the training loop
    variants = ["none", "fastckpt", "fastckpt_page_cache"]
    variants += [p for p in ("torch", "dcp") if p in peers]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for i in range(rounds):
        log(f"  training loop, round {i + 1} of {rounds} ...")
        for v in variants:
            runs[v].append(loop.run(v))
    out: dict[str, Any] = {"steps": steps, "every": loop.every, "rounds": rounds,
                           "variants": {v: {k: statistics.median(x[k] for x in rs)
                                            for k in rs[0]} for v, rs in runs.items()}}
    # Against the median step without checkpoints: a stray slow step on a shared
    # machine moves a median far less than a total.
    base = out["variants"]["none"]["median_step_s"] * steps
    for r in out["variants"].values():
        r["overhead"] = r["loop_s"] / base - 1
    out["state_bytes"] = out["variants"]["fastckpt"]["state_bytes"]
    return out


# -- the suite ----------------------------------------------------------------------


def run_suite(state: dict, workdir: str | None = None, reps: int = 3,
              peers: Sequence[str] = PEERS, train_steps: int = 24,
              log: Callable[[str], None] = print) -> dict:
    """Measure limits, saves, loads, peers and (``train_steps`` > 0) the training
    loop; returns a JSON-able dict of seconds, rates, ratios and targets."""
    tmp = tempfile.mkdtemp(prefix=".fastckpt-bench-", dir=workdir or os.getcwd())
    with warnings.catch_warnings():
        # DCP warns, also from its async threads, that it assumes a single process:
        # that is the intent here.
        warnings.filterwarnings("ignore", message=".*assuming the intent is to .* single process")
        try:
            return _run_suite(tmp, state, reps, peers, train_steps, log)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _run_suite(tmp: str, state: dict, reps: int, peers: Sequence[str], train_steps: int,
               log: Callable[[str], None]) -> dict:
    b = Bench(state, tmp, reps, drop_page_cache([]))
    n = b.nbytes
    log(f"state: {len(tensors_of(state))} tensors, {n / GiB:.2f} GiB; dir {tmp}")
    r: dict[str, Any] = {"nbytes": n, "tensors": len(tensors_of(state)), "reps": reps,
                         "dir": os.path.dirname(tmp), "peers": list(peers),
                         "native": fileio.native_available(),
                         "limits": {}, "save": {}, "load": {}}
    # (section, key, measurement); a measurement without a key returns several
    steps: list[tuple[str, str | None, Callable[[], Any]]] = [
        ("limits", "memcpy_s", b.memcpy),
        ("limits", None, b.raw_io),
        ("save", None, lambda: b.fastckpt_saves({
            "fastckpt": {}, "fastckpt_nochecksum": {"checksum": None},
            "fastckpt_buffered": {"direct_io": False},
            "fastckpt_zstd": {"compression": "zstd"},
            "fastckpt_auto": {"compression": "auto"}})),
    ]
    peer_steps = {"torch": [("save", "torch_save_s", b.torch_save)],
                  "safetensors": [("save", "safetensors_save_s", b.safetensors_save)],
                  "dcp": [("save", "dcp_save_s", b.dcp_save),
                          ("save", "dcp_async_save", b.dcp_async_save)]}
    steps += [s for p in peers for s in peer_steps.get(p, [])]
    for section, key, fn in steps:
        log(f"  measuring {section} {key or ''} ...")
        if key is None:
            r[section].update(fn())
        else:
            r[section][key] = fn()
    for name in ("fastckpt_nochecksum", "fastckpt_buffered", "fastckpt_auto"):
        _remove(b.path(name))
    log("  measuring loads (cold, warm) ...")
    r["load"].update(b.loads(b.load_variants(peers)))
    log(f"  measuring a lazy open of {LAZY_TENSORS} tensors ...")
    r["lazy_open"] = b.lazy_open()
    r["cold_method"] = b.cold_method or "O_DIRECT (raw read only; loads not cold)"
    if train_steps > 0:
        r["train"] = run_training(tmp, train_steps, reps, peers, log)
    return _with_ratios(r)


def _with_ratios(r: dict) -> dict:
    n, lim, sv, ld = r["nbytes"], r["limits"], r["save"], r["load"]
    rates = {"memcpy": n / lim["memcpy_s"], "raw_write": n / lim["raw_write_s"],
             "raw_read_cold": n / lim["raw_read"]["cold_s"],
             "raw_read_warm": n / lim["raw_read"]["warm_s"]}
    for k in ("fastckpt", "fastckpt_nochecksum", "fastckpt_zstd", "fastckpt_auto",
              "dcp_async_save"):
        if k in sv:
            rates[f"{k}_save"] = n / sv[k]["total_s"]
    for k in ("torch_save_s", "safetensors_save_s", "dcp_save_s"):
        if k in sv:
            rates[k[:-2]] = n / sv[k]
    for k, v in ld.items():
        rates[f"{k}_cold"], rates[f"{k}_warm"] = n / v["cold_s"], n / v["warm_s"]
    fc, warm = sv["fastckpt"], ld["fastckpt_mmap"]["warm_s"]
    ratios = {
        "stall_over_memcpy": fc["stall_s"] / lim["memcpy_s"],
        "throughput_over_raw_write": rates["fastckpt_save"] / rates["raw_write"],
        "checksum_cost": fc["total_s"] / sv["fastckpt_nochecksum"]["total_s"] - 1,
        "zstd_ratio": n / sv["fastckpt_zstd"]["disk_bytes"],
        "auto_ratio": n / sv["fastckpt_auto"]["disk_bytes"],
        "zstd_time_over_uncompressed": sv["fastckpt_zstd"]["total_s"] / fc["total_s"],
        "auto_time_over_uncompressed": sv["fastckpt_auto"]["total_s"] / fc["total_s"],
        "cold_restore_over_raw_read": rates["fastckpt_mmap_cold"] / rates["raw_read_cold"],
        "warm_restore_over_memcpy": rates["fastckpt_mmap_warm"] / rates["memcpy"],
        "load_checksum_cost": ld["fastckpt_verified"]["cold_s"] / ld["fastckpt_mmap"]["cold_s"]
        - 1,
        "verify_over_raw_read": rates["verify_cold"] / rates["raw_read_cold"],
        "native_over_fallback_cold": ld["fastckpt_read_fallback"]["cold_s"]
        / ld["fastckpt_read"]["cold_s"],
        "lazy_open_cold_s": r["lazy_open"]["cold_s"],
    }
    if "torch_save_s" in sv:
        ratios["speedup_vs_torch_save"] = sv["torch_save_s"] / fc["total_s"]
        ratios["warm_restore_over_torch_load"] = ld["torch_load"]["warm_s"] / warm
    if "safetensors_save_s" in sv:
        ratios["speedup_vs_safetensors"] = sv["safetensors_save_s"] / fc["total_s"]
        ratios["warm_restore_over_safetensors"] = ld["safetensors_load"]["warm_s"] / warm
    if "dcp_async_save" in sv:
        ratios["stall_over_dcp_stall"] = fc["stall_s"] / sv["dcp_async_save"]["stall_s"]
    r["rates_Bps"] = rates
    r["ratios"] = ratios
    r["targets"] = [{"target": d, "measured": v, "met": ok} for d, v, ok in check_targets(r)]
    return r


# (ratio key, comparison, threshold, description) — the save-path targets.
SAVE_TARGETS = [
    ("stall_over_memcpy", "<=", 1.5, "stall <= 1.5x one copy_ of the same bytes"),
    ("stall_over_dcp_stall", "<=", 0.2, "stall <= 1/5 of DCP async_save blocking"),
    ("throughput_over_raw_write", ">=", 0.9, "durable throughput >= 0.9x raw write+fsync"),
    ("speedup_vs_torch_save", ">=", 3.0, "throughput >= 3x torch.save+fsync"),
    ("speedup_vs_safetensors", ">=", 3.0, "throughput >= 3x safetensors save_file+fsync"),
    ("checksum_cost", "<", 0.03, "xxh3 checksum costs < 3% of save time"),
    ("zstd_time_over_uncompressed", "<=", 1.0,
     'compression="zstd" durable no later than uncompressed'),
    ("auto_time_over_uncompressed", "<=", 1.0,
     'compression="auto" durable no later than uncompressed'),
]

# The restore path: fastckpt.load(path) with its defaults, every page touched.
LOAD_TARGETS = [
    ("cold_restore_over_raw_read", ">=", 0.9, "cold full restore >= 0.9x raw sequential read"),
    ("warm_restore_over_memcpy", ">=", 0.5, "warm restore >= 0.5x memcpy"),
    ("warm_restore_over_safetensors", ">=", 2.0,
     "warm restore >= 2x safetensors load_file (+touch)"),
    ("warm_restore_over_torch_load", ">=", 3.0, "warm restore >= 3x torch.load"),
    ("load_checksum_cost", "<", 0.10, "verify=True costs < 10% of a cold restore"),
    ("lazy_open_cold_s", "<", 0.05,
     f"open a {LAZY_TENSORS:,}-tensor checkpoint and fetch one, cold: < 0.05 s"),
]


def check_targets(r: dict) -> list[tuple[str, float, bool]]:
    """(description, measured ratio, met?) for each target the run measured."""
    ops = {"<=": lambda v, t: v <= t, ">=": lambda v, t: v >= t, "<": lambda v, t: v < t}
    return [(desc, r["ratios"][key], ops[op](r["ratios"][key], thr))
            for key, op, thr, desc in SAVE_TARGETS + LOAD_TARGETS if key in r["ratios"]]


# -- report -------------------------------------------------------------------------

# (label, section, key) of each row, in table order.
_SAVE_ROWS = [("fastckpt", "fastckpt"), ("fastckpt, no checksum", "fastckpt_nochecksum"),
              ("fastckpt, through the page cache", "fastckpt_buffered"),
              ("fastckpt, zstd", "fastckpt_zstd"), ("fastckpt, auto", "fastckpt_auto"),
              ("torch.save", "torch_save_s"),
              ("safetensors save_file", "safetensors_save_s"), ("DCP save", "dcp_save_s"),
              ("DCP async_save", "dcp_async_save")]
_LOAD_ROWS = [("fastckpt.load (mmap, default)", "fastckpt_mmap"),
              ("fastckpt.load(mmap=False), native", "fastckpt_read"),
              ("fastckpt.load(mmap=False), Python fallback", "fastckpt_read_fallback"),
              ("fastckpt.load, zstd checkpoint", "fastckpt_zstd"),
              ("fastckpt.load(verify=True)", "fastckpt_verified"),
              ("fastckpt.load_into (in place)", "load_into"),
              ("fastckpt.verify", "verify")]
_PEER_LOAD_ROWS = [("torch.load", "torch_load"), ("torch.load(mmap=True)", "torch_load_mmap"),
                   ("safetensors load_file", "safetensors_load"),
                   ("DCP load (in place)", "dcp_load")]


def _gbs(n: int, s: float) -> str:
    return f"{n / s / 1e9:.2f}"


def save_rows(r: dict) -> list[tuple[str, float | None, float]]:
    """(label, stall seconds or None for a blocking save, durable seconds)."""
    out = []
    for label, key in _SAVE_ROWS:
        v = r["save"].get(key)
        if isinstance(v, dict):
            out.append((label, v["stall_s"], v["total_s"]))
        elif v is not None:
            out.append((label, None, v))
    return out


def format_report(r: dict) -> str:
    """Markdown tables of one run: limits, saves, loads, peers, training, targets."""
    n, lim, ld = r["nbytes"], r["limits"], r["load"]
    out = [f"{r['tensors']} tensors, {n / GiB:.2f} GiB, median of {r['reps']}; "
           f"cold cache by {r['cold_method']}; native I/O {'on' if r['native'] else 'off'}", ""]
    out += ["| hardware limit | seconds | GB/s |", "|---|---:|---:|"]
    out += [f"| {label} | {s:.3f} | {_gbs(n, s)} |" for label, s in (
        ("memcpy (one copy_)", lim["memcpy_s"]),
        ("raw write + fsync (the faster of page cache and O_DIRECT)", lim["raw_write_s"]),
        ("raw sequential read, cold", lim["raw_read"]["cold_s"]),
        ("raw sequential read, warm", lim["raw_read"]["warm_s"]))]
    out += ["", "| save (durable: + fsync) | stall s | durable s | GB/s | x raw write |",
            "|---|---:|---:|---:|---:|"]
    for label, stall, total in save_rows(r):
        stall_text = f"{stall:.3f}" if stall is not None else f"{total:.3f} (blocks)"
        out.append(f"| {label} | {stall_text} | {total:.3f} | {_gbs(n, total)} | "
                   f"{lim['raw_write_s'] / total:.2f} |")
    out.append(f"\nsmaller on disk: zstd {r['ratios']['zstd_ratio']:.2f}x, "
               f"auto {r['ratios']['auto_ratio']:.2f}x")
    for title, rows in (("fastckpt load", _LOAD_ROWS), ("peer load", _PEER_LOAD_ROWS)):
        out += ["", f"| {title} (+touch) | cold s | cold GB/s | x raw read | warm s | "
                    "warm GB/s | x memcpy |", "|---|---:|---:|---:|---:|---:|---:|"]
        for label, key in rows:
            if key in ld:
                c, w = ld[key]["cold_s"], ld[key]["warm_s"]
                out.append(f"| {label} | {c:.3f} | {_gbs(n, c)} | "
                           f"{lim['raw_read']['cold_s'] / c:.2f} | {w:.3f} | {_gbs(n, w)} | "
                           f"{lim['memcpy_s'] / w:.2f} |")
    lz = r["lazy_open"]
    out.append(f"\nlazy open of {lz['tensors']:,} tensors and fetch of one: "
               f"{lz['cold_s'] * 1e3:.1f} ms cold, {lz['warm_s'] * 1e3:.1f} ms warm")
    if "train" in r:
        t = r["train"]
        out += ["", f"training loop: {t['steps']} steps, a checkpoint every {t['every']} "
                    f"({t['state_bytes'] / 2**20:.0f} MiB of state), median of "
                    f"{t['rounds']} rounds", "",
                "| checkpointing | step ms | overhead | stall ms per checkpoint | "
                "drain s at end |", "|---|---:|---:|---:|---:|"]
        for v, x in t["variants"].items():
            out.append(f"| {v} | {x['step_s'] * 1e3:.1f} | {x['overhead']:+.1%} | "
                       f"{x['stall_s'] * 1e3:.1f} | {x['drain_s']:.2f} |")
    out += ["", "| target | measured | met |", "|---|---:|:---:|"]
    out += [f"| {t['target']} | {t['measured']:.3f} | {'yes' if t['met'] else 'NO'} |"
            for t in r["targets"]]
    return "\n".join(out)


def require_matplotlib() -> None:
    """Raise a clear error before a long run whose plot could not be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError("the plot needs matplotlib: pip install 'fastckpt[bench]'") from None


def plot(r: dict, path: str) -> None:
    """Draw one run as a PNG: throughput as a fraction of the hardware limit for
    saves, cold loads and warm loads; the stall of each save; the training loop's
    overhead; and the targets."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, lim, ld = r["nbytes"], r["limits"], r["load"]
    fig, axes = plt.subplots(2, 3, figsize=(20, 10), width_ratios=[1, 1, 1.15])
    saves = save_rows(r)
    _bars(axes[0, 0], [(label, lim["raw_write_s"] / total) for label, _, total in saves],
          "save: durable throughput / raw write+fsync", f"raw write+fsync "
          f"{_gbs(n, lim['raw_write_s'])} GB/s")
    loads = [(label, key) for label, key in _LOAD_ROWS + _PEER_LOAD_ROWS if key in ld]
    _bars(axes[0, 1], [(label, lim["raw_read"]["cold_s"] / ld[k]["cold_s"]) for label, k in loads],
          "cold load (+touch): throughput / raw sequential read",
          f"raw read cold {_gbs(n, lim['raw_read']['cold_s'])} GB/s")
    _bars(axes[0, 2], [(label, lim["memcpy_s"] / ld[k]["warm_s"]) for label, k in loads],
          "warm load (+touch): throughput / memcpy",
          f"memcpy {_gbs(n, lim['memcpy_s'])} GB/s")
    stalls = [(label, stall) if stall is not None else (f"{label} (blocking)", total)
              for label, stall, total in saves]
    _bars(axes[1, 0], stalls, "stall: seconds the save call blocks training", "one memcpy",
          limit=lim["memcpy_s"], fmt="{:.3f} s")
    if "train" in r:
        ov = [(v if v != "none" else "none (noise floor)", x["overhead"] * 100)
              for v, x in r["train"]["variants"].items()]
        _bars(axes[1, 1], ov, "training loop: step-time overhead of checkpointing (%)",
              "no checkpoints", limit=0.0, fmt="{:+.1f}%")
    else:
        axes[1, 1].axis("off")
    _targets_panel(axes[1, 2], r)
    fig.suptitle(f"fastckpt {__version__}: {n / GiB:.2f} GiB state, {r['dir']} "
                 f"(median of {r['reps']}; higher is better except stall and overhead)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bars(ax: Any, items: list[tuple[str, float]], title: str, limit_label: str,
          limit: float = 1.0, fmt: str = "{:.2f}x") -> None:
    labels = [label for label, _ in items]
    values = [v for _, v in items]
    colors = ["tab:blue" if label.startswith("fastckpt") else "tab:gray" for label in labels]
    y = range(len(items))
    ax.barh(y, values, color=colors)
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.axvline(limit, color="tab:red", linestyle="--")
    for i, v in enumerate(values):
        ax.text(v, i, " " + fmt.format(v), va="center", fontsize=9)
    ax.set_xlim(min(0.0, *values) * 1.25, max(limit, *values) * 1.25 or 1.0)
    # The reference goes in the title: a legend would cover some bar.
    ax.set_title(f"{title}\n(red dashes: {limit_label})", fontsize=11)


def _targets_panel(ax: Any, r: dict) -> None:
    ax.axis("off")
    ax.set_title("targets (measured ratio)", fontsize=11)
    step = 1.0 / max(12, len(r["targets"]))
    for i, t in enumerate(r["targets"]):
        text = f"{'met' if t['met'] else 'NOT MET'}: {t['target']} ({t['measured']:.2f})"
        ax.text(0.0, 1.0 - step * i, textwrap.fill(text, 46, subsequent_indent="    "),
                transform=ax.transAxes, fontsize=9, va="top",
                color="tab:green" if t["met"] else "tab:red")


def environment() -> dict:
    """Facts about the machine the numbers came from."""
    import psutil

    env = {"fastckpt": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "cpus": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
           "platform": platform.platform(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def write_json(r: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(r, f, indent=2, default=str)
        f.write("\n")

