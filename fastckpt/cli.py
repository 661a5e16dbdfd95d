"""The ``fastckpt`` command line: list, inspect, verify, compare, convert and prune
checkpoints, and benchmark checkpoint I/O on this machine.

``fastckpt COMMAND --help`` describes each command with an example. Errors print one
line, ``fastckpt: error: ...``, and exit with status 1 (2 for a bad command line);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

from . import __version__, commit, convert, reader, transfer
from . import manifest as mf
from .catalog import CheckpointInfo, filed_step, read_info
from .errors import CheckpointError, CheckpointNotFoundError
from .retention import rank
from .tree import dtype_from_name

KEEP_TAG = "keep"  # checkpoints tagged so are never pruned
Entry = CheckpointInfo  # one committed checkpoint under a root
_STEP_IN_NAME = re.compile(r"(\d+)$")
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 1 << 10, "m": 10**6, "mb": 10**6,
          "mib": 1 << 20, "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tb": 10**12,
          "tib": 1 << 40}


# -- small helpers --------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``"4GiB"``, ``"1.5GB"``, ``"64MiB"``, ``"512"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m and _UNITS.get(m.group(2).lower())
    if not unit:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 1.5GB, 512MiB)")
    return int(float(m.group(1)) * unit)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a count: {text!r}")
    return int(text)


def _positive(text: str) -> int:
    n = _count(text)
    if n == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def human(n: float) -> str:
    """Bytes in binary units, e.g. ``1.50 GiB``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.2f} {units[i]}"


def _when(t: float) -> str:
    try:
        return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, ValueError, OSError):  # a time beyond the calendar
        return "-"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
           right: Collection[int] = ()) -> str:
    """Columns aligned with spaces; those whose index is in ``right`` right-aligned."""
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _dump_json(obj: Any) -> None:
    print(json.dumps(_finite(obj), indent=2, default=_jsonable, allow_nan=False))


def _finite(v: Any) -> Any:
    """``v`` with NaN and infinities as None: JSON has no such numbers, and Python's
    ``NaN`` / ``Infinity`` extension is rejected by other parsers."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, set)):
        return list(v)
    if isinstance(v, bytes):
        return v.hex()
    return str(v)


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str, enabled: bool = True) -> Iterator[Any]:
    """A byte-counting bar (``update(n)``, thread-safe) shown on a terminal only."""
    from tqdm import tqdm

    show = enabled and sys.stdout.isatty() and sys.stderr.isatty()
    lock = threading.Lock()
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
              disable=not show, leave=False, file=sys.stderr) as bar:
        def update(n: int) -> None:
            with lock:
                bar.update(n)

        yield update


# -- ls / gc: the checkpoints under a root ---------------------------------------------


def _read_entry(path: str) -> Entry:
    """Describe a checkpoint from its manifest. Its step is the one a
    CheckpointManager files it under (a ``step_<n>`` directory is step n, whatever
    its metadata says), else the step in its metadata, else a trailing number in the
    directory name."""
    name = os.path.basename(path)
    info = read_info(path, filed_step(name))
    found = _STEP_IN_NAME.search(name)
    if info.step is None and found:
        info = dataclasses.replace(info, step=int(found.group(1)))
    return info


def scan(root: str, metric: str = "val_loss", mode: str = "min") -> list[Entry]:
    """The committed checkpoints directly under ``root``, oldest first (those with no
    step last), with the best (by ``metric``) and the latest (the highest step; one
    without a step never is) marked. Unreadable ones are skipped with a warning."""
    if not os.path.isdir(root):
        raise CheckpointNotFoundError(f"{root}: no such directory")
    found = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(".") or not commit.is_checkpoint(path):
            continue
        try:
            found.append(_read_entry(path))
        except CheckpointError as e:
            print(f"fastckpt: warning: skipping {path}: {e}", file=sys.stderr)
    found.sort(key=lambda e: (e.step is None, e.step or 0, e.time))
    best = rank(found, metric, mode)
    best_path = best[0].path if best else None
    stepped = [e for e in found if e.step is not None]
    latest = stepped[-1].path if stepped else None
    return [dataclasses.replace(e, is_best=e.path == best_path, is_latest=e.path == latest)
            for e in found]


def keep_set(entries: Sequence[Entry], keep_last: int | None, keep_best: int | None,
             metric: str, mode: str) -> dict[str, str]:
    """Path -> why it is kept: the latest always, the ``keep_last`` most recent, the
    ``keep_best`` best by ``metric``, anything tagged ``keep``, and any checkpoint
    without a step (nothing tells how recent it is)."""
    why: dict[str, list[str]] = {}
    stepped = [e for e in entries if e.step is not None]
    for e in stepped[-(keep_last or 1):]:
        why.setdefault(e.path, []).append("latest" if e.is_latest else "recent")
    for e in rank(entries, metric, mode)[: keep_best or 0]:
        why.setdefault(e.path, []).append(f"best {metric}")
    for e in entries:
        if KEEP_TAG in e.tags:
            why.setdefault(e.path, []).append("tagged keep")
        if e.step is None:
            why.setdefault(e.path, []).append("no step")
    return {p: ", ".join(r) for p, r in why.items()}


def _metrics_text(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in metrics.items())


def cmd_ls(args: argparse.Namespace) -> int:
    root = os.path.abspath(args.root)
    entries = scan(root, args.metric, args.mode)
    if args.json:
        _dump_json([dataclasses.asdict(e) for e in entries])
        return 0
    if not entries:
        print(f"no checkpoints under {root}")
        return 0
    rows = [[e.step if e.step is not None else "-", _when(e.time), human(e.size),
             _metrics_text(e.metrics), ",".join(e.tags),
             " ".join(m for m, on in (("best", e.is_best), ("latest", e.is_latest)) if on),
             os.path.basename(e.path)] for e in entries]
    print(_table(["STEP", "TIME", "SIZE", "METRICS", "TAGS", "MARK", "NAME"], rows, right=(0, 2)))
    total = sum(e.size for e in entries)
    print(f"\n{len(entries)} checkpoints, {human(total)} in {root}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    if args.keep_last is None and args.keep_best is None:
        raise CheckpointError("say what to keep: --keep-last N and/or --keep-best K")
    root = os.path.abspath(args.root)
    entries = scan(root, args.metric, args.mode)
    keep = keep_set(entries, args.keep_last, args.keep_best, args.metric, args.mode)
    doomed = [e for e in entries if e.path not in keep]
    rows = [[e.step if e.step is not None else "-", human(e.size),
             "keep" if e.path in keep else "DELETE", keep.get(e.path, ""),
             os.path.basename(e.path)] for e in entries]
    if rows:
        print(_table(["STEP", "SIZE", "ACTION", "WHY", "NAME"], rows, right=(0, 1)))
    freed = human(sum(e.size for e in doomed))
    if not args.yes:
        print(f"\nwould delete {len(doomed)} of {len(entries)} checkpoints ({freed}); "
              "run again with --yes to delete them")
        return 0
    for e in doomed:
        # The name disappears atomically first: no half-deleted checkpoint stays
        # visible, and a crash leaves only a leftover the next save cleans up.
        transfer.remove_checkpoint(e.path)
    if doomed:
        commit.fsync_dir(root)
    print(f"\ndeleted {len(doomed)} of {len(entries)} checkpoints ({freed})")
    return 0


# -- info -----------------------------------------------------------------------------


def describe(path: str, with_tensors: bool = False) -> dict:
    """A JSON-able summary of the checkpoint at ``path`` (and, if asked, each tensor)."""
    ckpt = reader.resolve(path)
    m = mf.read(ckpt)
    dtypes: dict[str, dict[str, int]] = {}
    for t in m.tensors.values():
        d = dtypes.setdefault(t.dtype, {"count": 0, "nbytes": 0})
        d["count"] += 1
        d["nbytes"] += t.nbytes
    codecs = sorted({t.codec["codec"] for t in m.tensors.values() if t.codec})
    out = {
        "path": ckpt,
        "format_version": m.raw.get("format_version"),
        "created": m.raw.get("created"),
        "library": m.raw.get("library", {}),
        "checksum": m.checksum,
        "compression": codecs[0] if len(codecs) == 1 else codecs or None,
        "tensors": len(m.tensors),
        "references": len(m.refs),
        "nbytes": m.nbytes,
        "disk_bytes": m.disk_bytes,
        "files_bytes": sum(s.size for s in m.shards),
        "compression_ratio": m.nbytes / m.disk_bytes if m.disk_bytes else 1.0,
        "shards": [{"file": s.file, "size": s.size} for s in m.shards],
        "dtypes": dtypes,
        "metadata": m.metadata,
    }
    if with_tensors:
        out["tensor_list"] = _tensor_rows(m)
    return out


def _tensor_rows(m: mf.Manifest) -> list[dict]:
    return [_pieces_row(m, ref, key) if "pieces" in ref else _tensor_row(m, ref, key)
            for ref, key in zip(m.refs, m.ref_paths(), strict=True)]


def _tensor_row(m: mf.Manifest, ref: dict, key: str) -> dict:
    t = m.tensor(ref["tensor"])
    view = ref.get("view")
    shape = list(view["shape"]) if view else list(t.shape)
    return {
        "key": key, "dtype": t.dtype, "shape": shape,
        "nbytes": math.prod(shape) * t.dtype_obj.itemsize,
        # A view shares the bytes of the stored tensor it views: it stores none.
        "stored_bytes": None if view else t.stop - t.start,
        "stored_as": t.name, "shard": t.shard,
    }


def _pieces_row(m: mf.Manifest, ref: dict, key: str) -> dict:
    """A tensor saved in pieces (by several ranks): ``stored_as`` and ``shard`` list
    the pieces' stored tensors and their files."""
    pieces = [m.tensor(p["tensor"]) for p in ref["pieces"]]
    return {
        "key": key, "dtype": ref["dtype"], "shape": list(ref["shape"]),
        "nbytes": math.prod(ref["shape"]) * dtype_from_name(ref["dtype"]).itemsize,
        "stored_bytes": sum(t.stop - t.start for t in pieces),
        "stored_as": [t.name for t in pieces], "shard": [t.shard for t in pieces],
    }


def cmd_info(args: argparse.Namespace) -> int:
    d = describe(args.path, args.tensors)
    if args.json:
        _dump_json(d)
        return 0
    lib = ", ".join(f"{k} {v}" for k, v in d["library"].items())
    ratio = (f"; {d['compression']}, ratio {d['compression_ratio']:.2f}x"
             if d["compression"] else "")
    lines = [
        ("checkpoint", d["path"]),
        ("created", f"{_when(d['created'] or 0)} ({lib})"),
        ("tensors", f"{d['tensors']} stored, {d['references']} references"),
        ("size", f"{human(d['nbytes'])} of tensors, {human(d['files_bytes'])} in "
                 f"{len(d['shards'])} shards{ratio}"),
        ("checksum", d["checksum"] or "none"),
    ]
    lines += [("dtype" if i == 0 else "", f"{name}: {v['count']} tensors, {human(v['nbytes'])}")
              for i, (name, v) in enumerate(sorted(d["dtypes"].items()))]
    lines += [("metadata" if i == 0 else "", f"{k} = {v!r}")
              for i, (k, v) in enumerate(d["metadata"].items())]
    width = max(len(k) for k, _ in lines)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in lines))
    if args.tensors:
        rows = [[r["key"], r["dtype"], "x".join(map(str, r["shape"])) or "scalar",
                 human(r["nbytes"]),
                 human(r["stored_bytes"]) if r["stored_bytes"] is not None
                 else f"view of {r['stored_as']}"] for r in d["tensor_list"]]
        print()
        print(_table(["KEY", "DTYPE", "SHAPE", "BYTES", "ON DISK"], rows, right=(3, 4)))
    return 0


# -- verify ---------------------------------------------------------------------------


def _shard_bytes(path: str) -> int:
    try:
        return sum(s.size for s in mf.read(reader.resolve(path), lazy=True).shards)
    except CheckpointError:
        return 0  # verify() reports it


def cmd_verify(args: argparse.Namespace) -> int:
    total = sum(_shard_bytes(p) for p in args.paths)
    t0 = time.perf_counter()
    with progress_bar(total, "verify", not args.json) as update, \
            cf.ThreadPoolExecutor(min(4, len(args.paths))) as pool:
        reports = list(pool.map(
            lambda p: reader.verify(p, workers=args.workers, progress=update), args.paths))
    elapsed = time.perf_counter() - t0
    bad = [r for r in reports if not r.ok]
    if args.json:
        _dump_json([{"path": r.path, "ok": r.ok, "problems": r.problems, "nbytes": r.nbytes}
                    for r in reports])
        return 1 if bad else 0
    for r in reports:
        if r.ok:
            print(f"ok    {r.path}  ({human(r.nbytes)})")
        for p in r.problems:
            print(f"FAIL  {p}")
    rate = f", {human(total / elapsed)}/s" if elapsed > 0 and total else ""
    print(f"\n{len(reports) - len(bad)} of {len(reports)} checkpoints ok "
          f"({human(total)} in {elapsed:.2f} s{rate})")
    return 1 if bad else 0


# -- diff -----------------------------------------------------------------------------

_DIFF_CHUNK = 1 << 22  # elements compared at a time: bounded extra memory per tensor


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest ``|a - b|`` over two tensors of one shape and dtype, computed in float64
    (complex128) chunk by chunk. Positions equal in both (NaN in both counts as
    equal, as do equal infinities) contribute 0; a NaN against a number gives NaN."""
    import torch

    a, b = a.reshape(-1), b.reshape(-1)
    if a.dtype == torch.bool:
        return float(bool((a != b).any()))
    work = torch.complex128 if a.is_complex() else torch.float64
    worst = 0.0
    for i in range(0, a.numel(), _DIFF_CHUNK):
        x, y = a[i:i + _DIFF_CHUNK].to(work), b[i:i + _DIFF_CHUNK].to(work)
        same = (x == y) | (x.isnan() & y.isnan())
        d = torch.where(same, 0.0, (x - y).abs()).max().item()
        if math.isnan(d):
            return math.nan
        worst = max(worst, d)
    return worst


def diff(a_path: str, b_path: str, atol: float = 0.0) -> dict:
    """Compare two checkpoints tensor by tensor (only one tensor of each is held in
    memory at a time): keys added in B, removed from A, changed in dtype or shape,
    and the max abs difference of every tensor present in both with the same
    dtype and shape. ``same`` is True when nothing differs by more than ``atol``."""
    from . import open as open_ckpt

    with open_ckpt(a_path) as ra, open_ckpt(b_path) as rb:
        ka, kb = ra.keys(), rb.keys()
        in_a, in_b = set(ka), set(kb)
        out: dict[str, Any] = {
            "a": ra.path, "b": rb.path,
            "added": [{"key": k, "spec": _spec(rb, k)} for k in kb if k not in in_a],
            "removed": [{"key": k, "spec": _spec(ra, k)} for k in ka if k not in in_b],
            "changed": [], "values": [],
        }
        for k in (k for k in ka if k in in_b):
            sa, sb = _spec(ra, k), _spec(rb, k)
            if sa != sb:
                out["changed"].append({"key": k, "a": sa, "b": sb})
            else:
                out["values"].append({"key": k, "spec": sa,
                                      "max_abs_diff": max_abs_diff(ra[k], rb[k])})
    differs = [v for v in out["values"] if not v["max_abs_diff"] <= atol]
    out["same"] = not (out["added"] or out["removed"] or out["changed"] or differs)
    return out


def _spec(r: reader.CheckpointReader, key: str) -> str:
    dtype, shape = r.spec(key)
    return f"{dtype}[{', '.join(map(str, shape))}]"


def cmd_diff(args: argparse.Namespace) -> int:
    d = diff(args.a, args.b, args.atol)
    if args.json:
        _dump_json(d)
        return 0 if d["same"] else 1
    print(f"--- {d['a']}\n+++ {d['b']}")
    for x in d["removed"]:
        print(f"- {x['key']}  {x['spec']}")
    for x in d["added"]:
        print(f"+ {x['key']}  {x['spec']}")
    for x in d["changed"]:
        print(f"~ {x['key']}  {x['a']} -> {x['b']}")
    shown = [v for v in d["values"] if args.all or not v["max_abs_diff"] <= args.atol]
    if shown:
        print()
        print(_table(["KEY", "TENSOR", "MAX ABS DIFF"],
                     [[v["key"], v["spec"], f"{v['max_abs_diff']:.6g}"] for v in shown],
                     right=(2,)))
    ndiff = sum(not v["max_abs_diff"] <= args.atol for v in d["values"])
    print(f"\n{len(d['removed'])} removed, {len(d['added'])} added, {len(d['changed'])} "
          f"changed dtype/shape; {ndiff} of {len(d['values'])} common tensors differ"
          + (f" by more than {args.atol:g}" if args.atol else ""))
    return 0 if d["same"] else 1


# -- convert --------------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    src_format = convert.detect(args.src)
    to = args.to or ("fastckpt" if src_format != "fastckpt"
                     else "safetensors" if args.dst.endswith(".safetensors") else "hf")
    if (src_format == "fastckpt") == (to == "fastckpt"):
        raise CheckpointError(f"cannot convert {src_format} to {to}: one side must be fastckpt")
    if args.compress and to != "fastckpt":
        raise CheckpointError("--compress applies to conversions into fastckpt")
    if args.prefix and to == "fastckpt":
        raise CheckpointError("--prefix applies to conversions out of fastckpt")
    t0 = time.perf_counter()
    compression = "zstd" if args.compress else None
    if to == "fastckpt":
        fn = convert.import_torch if src_format == "torch" else convert.import_safetensors
        r = fn(args.src, args.dst, compression=compression)
        print(f"wrote {r.path}: {human(r.nbytes)} from {src_format} "
              f"in {time.perf_counter() - t0:.2f} s")
        return 0
    with progress_bar(None, "convert") as update:
        def progress(n: int, total: int) -> None:
            update(n)

        if to == "hf":
            dest = convert.export_hf(args.src, args.dst, prefix=args.prefix,
                                     max_shard_size=args.max_shard_size, progress=progress)
        else:
            dest = convert.export_safetensors(args.src, args.dst, prefix=args.prefix,
                                              progress=progress)
    print(f"wrote {dest} ({to}) in {time.perf_counter() - t0:.2f} s")
    return 0


# -- bench ----------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    from . import benchmark as fb

    peers = tuple(p for p in args.peers.split(",") if p)
    unknown = set(peers) - set(fb.PEERS)
    if unknown:
        raise CheckpointError(f"unknown peers {sorted(unknown)}; choose from {list(fb.PEERS)}")
    if args.plot:
        fb.require_matplotlib()
    state = fb.model_like_state(args.size)
    log = _stderr if sys.stdout.isatty() else lambda msg: None  # progress on a terminal only
    r = fb.run_suite(state, workdir=args.dir, reps=args.reps, peers=peers,
                     train_steps=args.train_steps, log=log)
    r["environment"] = fb.environment()
    print(fb.format_report(r))
    if args.json:
        fb.write_json(r, args.json)
        print(f"\nJSON: {args.json}")
    if args.plot:
        fb.plot(r, args.plot)
        print(f"plot: {args.plot}")
    return 0


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the parser -----------------------------------------------------------------------

_EXAMPLES = {
    "ls": "example:\n  fastckpt ls checkpoints/ --metric val_loss --mode min",
    "info": "example:\n  fastckpt info checkpoints/step_00001000 --tensors",
    "verify": "example:\n  fastckpt verify checkpoints/step_*  (exit status 1 if any is damaged)",
    "diff": "example:\n  fastckpt diff checkpoints/step_00001000 checkpoints/step_00002000\n"
            "exit status: 0 when nothing differs, 1 otherwise (like diff(1))",
    "convert": "examples:\n  fastckpt convert model.pt ckpt/imported --compress\n"
               "  fastckpt convert hf-model/ ckpt/imported\n"
               "  fastckpt convert ckpt/step_10 export/ --to hf --prefix model\n"
               "  fastckpt convert ckpt/step_10 weights.safetensors",
    "gc": "example:\n  fastckpt gc checkpoints/ --keep-last 3 --keep-best 2 --metric val_loss"
          "          (dry run)\n"
          "  fastckpt gc checkpoints/ --keep-last 3 --yes",
    "bench": "example:\n  fastckpt bench --size 4GiB --dir /lustre/scratch/me "
             "--json bench.json --plot bench.png",
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    p = argparse.ArgumentParser(prog="fastckpt", description=__doc__.split("\n\n")[0],
                                parents=[common])
    p.add_argument("--version", action="version", version=f"fastckpt {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help, epilog=_EXAMPLES[name],
                           parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter)
        c.set_defaults(func=func)
        return c

    def json_flag(c: argparse.ArgumentParser) -> None:
        c.add_argument("--json", action="store_true",
                       help="print JSON instead of tables (NaN and infinities as null)")

    def ranking(c: argparse.ArgumentParser) -> None:
        c.add_argument("--metric", default="val_loss", help="metric ranking checkpoints "
                       "(default val_loss)")
        c.add_argument("--mode", choices=("min", "max"), default="min",
                       help="whether lower or higher --metric is better (default min)")

    c = command("ls", cmd_ls, "list the checkpoints under a directory")
    c.add_argument("root", metavar="ROOT")
    ranking(c)
    json_flag(c)

    c = command("info", cmd_info, "summarise a checkpoint: tensors, dtypes, sizes, metadata")
    c.add_argument("path", metavar="CKPT")
    c.add_argument("--tensors", action="store_true", help="list every tensor")
    json_flag(c)

    c = command("verify", cmd_verify, "check checkpoints against their checksums")
    c.add_argument("paths", nargs="+", metavar="CKPT")
    c.add_argument("--workers", type=_positive, default=min(8, os.cpu_count() or 2),
                   help="shards checked in parallel per checkpoint")
    json_flag(c)

    c = command("diff", cmd_diff, "compare the tensors of two checkpoints")
    c.add_argument("a", metavar="A")
    c.add_argument("b", metavar="B")
    c.add_argument("--atol", type=float, default=0.0,
                   help="differences up to this are not reported (default 0)")
    c.add_argument("--all", action="store_true", help="also list tensors that are equal")
    json_flag(c)

    c = command("convert", cmd_convert,
                "convert torch.save / safetensors files into fastckpt, or fastckpt into "
                "safetensors / a Hugging Face folder")
    c.add_argument("src", metavar="SRC")
    c.add_argument("dst", metavar="DST")
    c.add_argument("--to", choices=("fastckpt", "safetensors", "hf"),
                   help="output format (default: fastckpt, or for a fastckpt SRC: "
                        "safetensors when DST ends in .safetensors, else hf)")
    c.add_argument("--compress", action="store_true", help="zstd-compress the new checkpoint")
    c.add_argument("--prefix", help="export only the tensors under this key path, "
                                    "without it (e.g. model)")
    c.add_argument("--max-shard-size", type=parse_size, default=convert.DEFAULT_MAX_SHARD,
                   help="largest file of an hf export (default 5GiB)")

    c = command("gc", cmd_gc, "delete old checkpoints under a directory (a dry run unless --yes)")
    c.add_argument("root", metavar="ROOT")
    c.add_argument("--keep-last", type=_count, metavar="N",
                   help="keep the N most recent steps (a checkpoint with no step is "
                        "never deleted)")
    c.add_argument("--keep-best", type=_count, metavar="K", help="keep the K best by --metric")
    ranking(c)
    c.add_argument("--yes", action="store_true", help="really delete")

    c = command("bench", cmd_bench, "benchmark checkpoint save/load against this machine's "
                                    "limits and against torch, safetensors and DCP")
    c.add_argument("--size", type=parse_size, default=1 << 30,
                   help="training state size (default 1GiB)")
    c.add_argument("--dir", help="directory on the disk to measure (default: current)")
    c.add_argument("--peers", default="torch,safetensors,dcp",
                   help="comma-separated peers to compare with (default all)")
    c.add_argument("--reps", type=int, default=3, help="repetitions per measurement")
    c.add_argument("--train-steps", type=int, default=24,
                   help="steps of the simulated training loop (0: skip it)")
    c.add_argument("--json", metavar="OUT", help="write the results as JSON")
    c.add_argument("--plot", metavar="OUT.png", help="draw the results (needs matplotlib)")
    return p


def error_line(e: BaseException) -> str:
    """One line naming what went wrong."""
    if isinstance(e, OSError) and not isinstance(e, CheckpointError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}"
    text = str(e) if isinstance(e, (CheckpointError, ValueError)) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastckpt`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("fastckpt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if getattr(args, "debug", False):
            raise
        print(f"fastckpt: error: {error_line(e)}", file=sys.stderr)
        return 1
