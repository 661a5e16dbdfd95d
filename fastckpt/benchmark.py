"""Checkpoint I/O benchmark: fastckpt against the hardware's limits and its peers,
all measured in one run on the same bytes in the same directory.

The machine may be shared and noisy, so results are ratios of quantities taken
side by side, each the median of a few repetitions.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import __version__
from .checkpointer import Checkpointer

GiB = 1 << 30


def model_like_state(nbytes: int = GiB, seed: int = 0) -> dict:
    """A mixed-precision training state of about ``nbytes``: bf16 weights of
    transformer-like shapes plus fp32 Adam moments (10 bytes per parameter)."""
    g = torch.Generator().manual_seed(seed)
    hidden = 1024
    shapes = [(32000, hidden)]  # embedding
    params = 32000 * hidden
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


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fsync_tree(path: str) -> None:
    paths = [path] if os.path.isfile(path) else [
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
    ]
    for p in paths:
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


@dataclass
class Bench:
    """One benchmark run over ``state`` in ``workdir``."""

    state: dict
    workdir: str
    reps: int = 3
    results: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return state_bytes(self.state)

    def _path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def memcpy(self) -> float:
        """Seconds for one ``copy_`` of every tensor into preallocated memory."""
        src = tensors_of(self.state)
        dst = [torch.empty_like(t) for t in src]

        def copy() -> None:
            for d, s in zip(dst, src, strict=True):
                d.copy_(s)

        copy()  # first touch of the destination pages is not part of a copy
        return _median_time(copy, self.reps)

    def raw_write(self) -> float:
        """Seconds to write the same byte count sequentially in 64 MiB writes + fsync."""
        chunk = torch.empty(64 << 20, dtype=torch.uint8).fill_(7).numpy()
        path = self._path("raw.bin")

        def write() -> None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                left = self.nbytes
                while left > 0:
                    left -= os.write(fd, chunk[: min(left, len(chunk))])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.remove(path)

        return _median_time(write, self.reps)

    def fastckpt_save(self, checksum: str | None = "xxh3") -> dict:
        """Steady-state stall and durable time of fastckpt.save (one warm-up save)."""
        path = self._path("fastckpt")
        stalls, totals = [], []
        with Checkpointer(checksum=checksum) as ck:
            for i in range(self.reps + 1):
                _remove(path)
                gc.collect()
                r = ck.save(self.state, path).wait()
                if i:
                    stalls.append(r.stall_s)
                    totals.append(r.total_s)
        _remove(path)
        return {"stall_s": statistics.median(stalls), "total_s": statistics.median(totals)}

    def torch_save(self) -> float:
        path = self._path("torch.pt")

        def save() -> None:
            torch.save(self.state, path)
            _fsync_tree(path)
            os.remove(path)

        return _median_time(save, max(1, self.reps - 1))

    def safetensors_save(self) -> float:
        from safetensors.torch import save_file

        path = self._path("st.safetensors")
        flat = flat_state(self.state)

        def save() -> None:
            save_file(flat, path)
            _fsync_tree(path)
            os.remove(path)

        return _median_time(save, max(1, self.reps - 1))

    def dcp_async_save(self) -> dict:
        """Blocking time and durable time of torch.distributed.checkpoint.async_save."""
        import torch.distributed.checkpoint as dcp

        path = self._path("dcp")
        blocks, totals = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
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


def run_save_suite(state: dict, workdir: str | None = None, reps: int = 3,
                   peers: tuple[str, ...] = ("torch", "safetensors", "dcp"),
                   log: Callable[[str], None] = print) -> dict:
    """Measure the save path; returns a JSON-able dict of seconds, rates and ratios."""
    tmp = tempfile.mkdtemp(prefix=".fastckpt-bench-", dir=workdir or os.getcwd())
    try:
        b = Bench(state, tmp, reps)
        n = b.nbytes
        log(f"state: {len(tensors_of(state))} tensors, {n / GiB:.2f} GiB; dir {tmp}")
        r: dict[str, Any] = {"nbytes": n}
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("memcpy_s", b.memcpy),
            ("raw_write_s", b.raw_write),
            ("fastckpt", b.fastckpt_save),
            ("fastckpt_nochecksum", lambda: b.fastckpt_save(checksum=None)),
        ]
        peer_steps = {"torch": ("torch_save_s", b.torch_save),
                      "safetensors": ("safetensors_save_s", b.safetensors_save),
                      "dcp": ("dcp_async_save", b.dcp_async_save)}
        steps += [peer_steps[p] for p in peers if p in peer_steps]
        for name, fn in steps:
            log(f"  measuring {name} ...")
            r[name] = fn()
        return _with_ratios(r)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _with_ratios(r: dict) -> dict:
    n = r["nbytes"]
    fc = r["fastckpt"]
    rates = {"raw_write": n / r["raw_write_s"], "fastckpt": n / fc["total_s"],
             "memcpy": n / r["memcpy_s"]}
    ratios = {
        "stall_over_memcpy": fc["stall_s"] / r["memcpy_s"],
        "throughput_over_raw_write": rates["fastckpt"] / rates["raw_write"],
        "checksum_cost": fc["total_s"] / r["fastckpt_nochecksum"]["total_s"] - 1,
    }
    if "torch_save_s" in r:
        rates["torch_save"] = n / r["torch_save_s"]
        ratios["speedup_vs_torch_save"] = r["torch_save_s"] / fc["total_s"]
    if "safetensors_save_s" in r:
        rates["safetensors_save"] = n / r["safetensors_save_s"]
        ratios["speedup_vs_safetensors"] = r["safetensors_save_s"] / fc["total_s"]
    if "dcp_async_save" in r:
        rates["dcp_async_save"] = n / r["dcp_async_save"]["total_s"]
        ratios["stall_over_dcp_stall"] = fc["stall_s"] / r["dcp_async_save"]["stall_s"]
    r["rates_Bps"] = rates
    r["ratios"] = ratios
    return r


# (ratio key, comparison, threshold, description) — the save-path targets.
SAVE_TARGETS = [
    ("stall_over_memcpy", "<=", 1.5, "stall <= 1.5x one copy_ of the same bytes"),
    ("stall_over_dcp_stall", "<=", 0.2, "stall <= 1/5 of DCP async_save blocking"),
    ("throughput_over_raw_write", ">=", 0.9, "durable throughput >= 0.9x raw write+fsync"),
    ("speedup_vs_torch_save", ">=", 3.0, "throughput >= 3x torch.save+fsync"),
    ("speedup_vs_safetensors", ">=", 3.0, "throughput >= 3x safetensors save_file+fsync"),
    ("checksum_cost", "<", 0.03, "xxh3 checksum costs < 3% of save time"),
]


def check_targets(r: dict) -> list[tuple[str, float, bool]]:
    """(description, measured ratio, met?) for each target the run measured."""
    out = []
    for key, op, thr, desc in SAVE_TARGETS:
        if key in r["ratios"]:
            v = r["ratios"][key]
            out.append((desc, v, v <= thr if op == "<=" else v >= thr if op == ">=" else v < thr))
    return out


def format_report(r: dict) -> str:
    """Markdown tables of one run's measurements and targets."""
    n = r["nbytes"]
    gbs = {k: v / 1e9 for k, v in r["rates_Bps"].items()}
    fc, lines = r["fastckpt"], []
    lines += ["| quantity | seconds | GB/s |", "|---|---:|---:|"]
    rows = [("memcpy (one copy_)", r["memcpy_s"], gbs["memcpy"]),
            ("raw write + fsync", r["raw_write_s"], gbs["raw_write"]),
            ("fastckpt save: stall", fc["stall_s"], n / fc["stall_s"] / 1e9),
            ("fastckpt save: durable", fc["total_s"], gbs["fastckpt"]),
            ("fastckpt save, no checksum: durable", r["fastckpt_nochecksum"]["total_s"],
             n / r["fastckpt_nochecksum"]["total_s"] / 1e9)]
    if "torch_save_s" in r:
        rows.append(("torch.save + fsync", r["torch_save_s"], gbs["torch_save"]))
    if "safetensors_save_s" in r:
        rows.append(("safetensors save_file + fsync", r["safetensors_save_s"],
                     gbs["safetensors_save"]))
    if "dcp_async_save" in r:
        d = r["dcp_async_save"]
        rows.append(("DCP async_save: blocking", d["stall_s"], n / d["stall_s"] / 1e9))
        rows.append(("DCP async_save: durable", d["total_s"], gbs["dcp_async_save"]))
    lines += [f"| {name} | {s:.3f} | {g:.2f} |" for name, s, g in rows]
    lines += ["", "| target | measured | met |", "|---|---:|:---:|"]
    lines += [f"| {d} | {v:.3f} | {'yes' if ok else 'NO'} |" for d, v, ok in check_targets(r)]
    return "\n".join(lines)


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
