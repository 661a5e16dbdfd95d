"""The ``fastckpt`` command line on real checkpoints.

Each command runs once as a user runs it (``python -m fastckpt ...`` in a child
process: exit status, stdout, stderr); variants of it run in-process through
``cli.main`` to keep the suite fast.
"""

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from conftest import assert_same
from safetensors.torch import load_file, save_file

import fastckpt
from fastckpt import benchmark, cli
from fastckpt.errors import CheckpointNotFoundError


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastckpt", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def weights(step):
    g = torch.Generator().manual_seed(0)
    return {"fc.weight": torch.randn(64, 32, generator=g) + step / 1000,
            "fc.bias": torch.zeros(32), "emb": torch.randn(100, 16, generator=g)}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A run root with three steps (val_loss best at step 200), a damaged copy, and a
    compressed checkpoint with different keys."""
    base = tmp_path_factory.mktemp("cli")
    root = base / "run"
    root.mkdir()
    for step, loss in ((100, 0.9), (200, 0.4), (300, 0.6)):
        tags = ["keep"] if step == 100 else []
        meta = {"step": step, "metrics": {"val_loss": loss}, "tags": tags}
        fastckpt.save({"model": weights(step), "step": step}, root / f"step_{step:08d}",
                      metadata=meta).wait()
    bad = base / "damaged"
    shutil.copytree(root / "step_00000200", bad)
    shard = next(bad.glob("shard-*"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    # fc.weight is large enough (>= 64 KiB) to be compressed
    other = {"model": {"fc.weight": torch.zeros(256, 128), "head": torch.ones(8, 8)}, "step": 1}
    with fastckpt.Checkpointer(compression="zstd") as ck:
        ck.save(other, base / "zstd").wait()
    return base


def test_ls_lists_steps_metrics_and_marks(ckpts, capsys):
    r = run_cli("ls", ckpts / "run", "--json")
    assert r.returncode == 0, r.stderr
    entries = json.loads(r.stdout)
    assert [e["step"] for e in entries] == [100, 200, 300]
    assert [e["is_best"] for e in entries] == [False, True, False]
    assert [e["is_latest"] for e in entries] == [False, False, True]
    assert entries[0]["tags"] == ["keep"] and entries[1]["metrics"] == {"val_loss": 0.4}
    assert all(e["size"] > 0 and e["checksum"] for e in entries)

    assert cli.main(["ls", str(ckpts / "run"), "--mode", "max"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["STEP", "TIME", "SIZE", "METRICS"]
    assert "best" in table[1] and "latest" in table[3]  # val_loss 0.9 is best when maximised


def test_info_summarises_and_lists_tensors(ckpts, capsys):
    r = run_cli("info", ckpts / "run" / "step_00000100", "--tensors", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["tensors"] == 3 and d["nbytes"] == (64 * 32 + 32 + 100 * 16) * 4
    assert d["metadata"]["step"] == 100 and d["compression"] is None
    rows = {t["key"]: t for t in d["tensor_list"]}
    assert rows["model/fc.weight"]["shape"] == [64, 32]
    assert rows["model/fc.weight"]["dtype"] == "float32"
    assert rows["model/emb"]["stored_bytes"] == 100 * 16 * 4

    assert cli.main(["info", str(ckpts / "zstd"), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "zstd, ratio" in out and "model/head" in out
    assert cli.main(["info", str(ckpts / "zstd"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["compression_ratio"] > 10  # zeros and ones


# Two gloo ranks save one checkpoint whose "emb" is stored as one piece per rank.
SAVE_BY_TWO_RANKS = """
import sys, torch, torch.distributed as dist
import fastckpt
from fastckpt.dist import Sharded
rank, d = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=rank, world_size=2)
full = torch.arange(60, dtype=torch.float32).reshape(10, 6)
fastckpt.save({"emb": Sharded.chunk(full, 0, rank, 2), "x": torch.ones(3)},
              f"{d}/ckpt").wait(timeout=60)
dist.barrier()
dist.destroy_process_group()
"""


def test_info_lists_a_tensor_saved_in_pieces(tmp_path, capsys):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ranks = [subprocess.Popen([sys.executable, "-c", SAVE_BY_TWO_RANKS, str(r), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
             for r in range(2)]
    for p in ranks:
        out = p.communicate(timeout=120)[0]
        assert p.returncode == 0, out.decode(errors="replace")
    ckpt = tmp_path / "ckpt"
    assert cli.main(["info", str(ckpt), "--tensors", "--json"]) == 0
    rows = {t["key"]: t for t in json.loads(capsys.readouterr().out)["tensor_list"]}
    emb = rows["emb"]
    assert (emb["dtype"], emb["shape"], emb["nbytes"]) == ("float32", [10, 6], 240)
    assert emb["stored_bytes"] == 240 and len(emb["stored_as"]) == 2
    assert rows["x"]["shape"] == [3]
    assert cli.main(["info", str(ckpt), "--tensors"]) == 0
    assert any(line.split()[:3] == ["emb", "float32", "10x6"]
               for line in capsys.readouterr().out.splitlines())
    assert cli.main(["diff", str(ckpt), str(ckpt)]) == 0  # identical, pieces and all


def test_verify_exit_status_and_one_line_per_problem(ckpts, capsys):
    good, bad = ckpts / "run" / "step_00000100", ckpts / "damaged"
    r = run_cli("verify", good, bad)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert any(x.startswith("ok") and str(good) in x for x in lines)
    fails = [x for x in lines if x.startswith("FAIL")]
    assert fails and all(str(bad) in x for x in fails)
    assert "Traceback" not in r.stderr

    assert cli.main(["verify", str(good), "--json"]) == 0
    [report] = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["problems"] == [] and report["nbytes"] > 0


def test_missing_path_is_one_line_without_traceback(tmp_path):
    r = run_cli("info", tmp_path / "nope")
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("fastckpt: error: ") and "nope" in r.stderr
    with pytest.raises(CheckpointNotFoundError):  # --debug: the exception itself
        cli.main(["info", str(tmp_path / "nope"), "--debug"])


def test_diff_reports_keys_shapes_and_values(ckpts, capsys):
    a, b = ckpts / "run" / "step_00000100", ckpts / "run" / "step_00000300"
    r = run_cli("diff", a, ckpts / "zstd", "--json")
    assert r.returncode == 1, r.stderr
    d = json.loads(r.stdout)
    assert [x["key"] for x in d["added"]] == ["model/head"]
    assert {x["key"] for x in d["removed"]} == {"model/fc.bias", "model/emb"}
    assert d["changed"] == [{"key": "model/fc.weight", "a": "float32[64, 32]",
                             "b": "float32[256, 128]"}]

    assert cli.main(["diff", str(a), str(b), "--json"]) == 1
    values = {v["key"]: v["max_abs_diff"] for v in json.loads(capsys.readouterr().out)["values"]}
    assert values["model/fc.weight"] == pytest.approx(0.2, abs=1e-5)
    assert values["model/fc.bias"] == 0 and values["model/emb"] == 0
    assert cli.main(["diff", str(a), str(b), "--atol", "0.5"]) == 0
    assert cli.main(["diff", str(a), str(a)]) == 0


def test_max_abs_diff_nan_and_inf():
    x = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    assert cli.max_abs_diff(x, x.clone()) == 0
    assert cli.max_abs_diff(x, torch.tensor([1.0, float("nan"), float("inf"), 5.0])) == 3
    assert cli.max_abs_diff(x, torch.tensor([1.0, 0.0, float("inf"), 2.0])) != 0  # NaN


def test_convert_torch_safetensors_hf_roundtrip(ckpts, tmp_path, capsys):
    state = {"model": weights(7), "extra": {"ids": torch.arange(5)}}
    torch.save(state, tmp_path / "model.pt")
    r = run_cli("convert", tmp_path / "model.pt", tmp_path / "imported", "--compress")
    assert r.returncode == 0, r.stderr
    assert_same(fastckpt.load(tmp_path / "imported"), state)
    assert fastckpt.open(tmp_path / "imported").metadata["imported_from"].endswith("model.pt")

    # out to a sharded Hugging Face folder, the model's own names
    assert cli.main(["convert", str(tmp_path / "imported"), str(tmp_path / "hf"), "--to", "hf",
                     "--prefix", "model", "--max-shard-size", "7KiB"]) == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state["model"].values())
    assert set(index["weight_map"]) == set(state["model"])
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    loaded = {}
    for f in files:
        loaded.update(load_file(tmp_path / "hf" / f))
    assert_same(dict(sorted(loaded.items())), dict(sorted(state["model"].items())))

    # back in from the folder, and out to one file
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert_same(dict(sorted(fastckpt.load(tmp_path / "back").items())),
                dict(sorted(state["model"].items())))
    assert cli.main(["convert", str(tmp_path / "back"), str(tmp_path / "one.safetensors")]) == 0
    assert_same(load_file(tmp_path / "one.safetensors")["fc.weight"], state["model"]["fc.weight"])
    # a single safetensors file in, and nothing is ever overwritten
    save_file({"w": torch.ones(3)}, tmp_path / "w.safetensors")
    assert cli.main(["convert", str(tmp_path / "w.safetensors"), str(tmp_path / "w")]) == 0
    assert_same(fastckpt.load(tmp_path / "w"), {"w": torch.ones(3)})
    assert cli.main(["convert", str(tmp_path / "back"), str(tmp_path / "one.safetensors")]) == 1
    assert "already exists" in capsys.readouterr().err


def test_convert_refuses_pickled_objects(tmp_path, capsys):
    torch.save({"w": torch.ones(2), "obj": _Opaque()}, tmp_path / "evil.pt")
    assert cli.main(["convert", str(tmp_path / "evil.pt"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastckpt: error: ") and "weights_only" in err
    assert not (tmp_path / "out").exists()


class _Opaque:
    pass


def test_gc_dry_run_then_delete(ckpts, tmp_path, capsys):
    root = tmp_path / "run"
    shutil.copytree(ckpts / "run", root)
    r = run_cli("gc", root, "--keep-last", "1")
    assert r.returncode == 0, r.stderr
    assert "would delete 1 of 3" in r.stdout  # step 100 is tagged keep, 300 is latest
    assert len(list(root.iterdir())) == 3

    assert cli.main(["gc", str(root), "--keep-last", "1", "--keep-best", "1", "--yes"]) == 0
    assert "deleted 0 of 3" in capsys.readouterr().out  # 200 is the best
    assert cli.main(["gc", str(root), "--keep-last", "1", "--yes"]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["step_00000100", "step_00000300"]
    assert cli.main(["gc", str(root)]) == 1  # nothing said about what to keep


def test_verify_needs_a_worker(ckpts, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["verify", str(ckpts / "run" / "step_00000100"), "--workers", "0"])
    assert e.value.code == 2
    assert "--workers" in capsys.readouterr().err


def strict_json(text):
    """Parse JSON as any other parser would: no NaN or Infinity."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_json_output_has_no_nan(tmp_path, capsys):
    root = tmp_path / "run"
    root.mkdir()
    for step, loss in ((1, float("nan")), (2, float("inf"))):
        t = torch.tensor([float(step), loss])
        fastckpt.save({"t": t}, root / f"step_{step:08d}",
                      metadata={"step": step, "metrics": {"val_loss": loss}}).wait()
    assert cli.main(["ls", str(root), "--json"]) == 0
    entries = strict_json(capsys.readouterr().out)
    assert [e["metrics"]["val_loss"] for e in entries] == [None, None]
    assert cli.main(["diff", str(root / "step_00000001"), str(root / "step_00000002"),
                     "--json"]) == 1
    assert strict_json(capsys.readouterr().out)["values"][0]["max_abs_diff"] is None


def test_ls_and_gc_take_steps_as_the_manager_files_them(tmp_path, capsys):
    root = tmp_path / "run"
    with fastckpt.CheckpointManager(root) as m:
        for step in (100, 200):
            m.save(step, {"x": torch.ones(3) * step}, metrics={"val_loss": 1 / step})
    # Filed as step 300 by its name, though its metadata says step 3.
    fastckpt.save({"x": torch.ones(3)}, root / "step_00000300",
                  metadata={"step": 3, "metrics": {"val_loss": 1.0}}).wait()
    fastckpt.save({"w": torch.zeros(2)}, root / "pretrained").wait()  # no step at all
    assert cli.main(["ls", str(root), "--json"]) == 0
    entries = strict_json(capsys.readouterr().out)
    assert [(e["step"], os.path.basename(e["path"])) for e in entries] == [
        (100, "step_00000100"), (200, "step_00000200"), (300, "step_00000300"),
        (None, "pretrained")]
    assert [e["is_latest"] for e in entries] == [False, False, True, False]

    assert cli.main(["gc", str(root), "--keep-last", "1", "--yes"]) == 0
    assert "no step" in capsys.readouterr().out
    assert sorted(os.listdir(root)) == ["fastckpt-index.json", "pretrained", "step_00000300"]
    with fastckpt.CheckpointManager(root) as m:
        assert m.latest().step == 300


def test_ls_and_gc_survive_odd_metadata(tmp_path, capsys):
    root = tmp_path / "run"
    odd = {"step_00000001": {"step": 1, "time": "2024-01-01"},
           "step_00000002": {"step": 2, "time": 1e300, "metrics": {"val_loss": 10**400}},
           "step_00000003": {"step": 3, "time": float("nan"), "metrics": {"val_loss": 0.5}}}
    root.mkdir()
    for name, meta in odd.items():
        fastckpt.save({"x": torch.ones(2)}, root / name, metadata=meta).wait()
    assert cli.main(["ls", str(root)]) == 0
    assert "3 checkpoints" in capsys.readouterr().out
    assert cli.main(["ls", str(root), "--json", "--mode", "max"]) == 0
    entries = strict_json(capsys.readouterr().out)
    assert [e["is_best"] for e in entries] == [False, True, False]
    assert entries[1]["metrics"]["val_loss"] == 10**400
    assert cli.main(["gc", str(root), "--keep-best", "1", "--mode", "max", "--yes"]) == 0
    assert sorted(os.listdir(root)) == ["step_00000002", "step_00000003"]


def test_gc_removes_a_symlinked_step_not_its_target(ckpts, tmp_path, capsys):
    root = tmp_path / "run"
    root.mkdir()
    os.symlink(ckpts / "run" / "step_00000200", root / "step_00000200")
    shutil.copytree(ckpts / "run" / "step_00000300", root / "step_00000300")
    assert cli.main(["gc", str(root), "--keep-last", "1", "--yes"]) == 0
    assert "deleted 1 of 2" in capsys.readouterr().out
    assert os.listdir(root) == ["step_00000300"]  # no hidden leftover either
    assert fastckpt.verify(ckpts / "run" / "step_00000200").ok


@pytest.mark.parametrize("command", ["ls", "info", "verify", "diff", "convert", "gc", "bench"])
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert "example" in capsys.readouterr().out


def test_parse_size():
    assert cli.parse_size("64MiB") == 64 << 20
    assert cli.parse_size("1.5GB") == 1_500_000_000
    assert cli.parse_size("4096") == 4096


BENCH_FIELDS = {
    "limits": {"memcpy_s", "raw_write_s", "raw_read", "raw_by_threads"},
    "save": {"fastckpt", "fastckpt_nochecksum", "fastckpt_buffered", "fastckpt_zstd",
             "fastckpt_auto", "torch_save_s", "safetensors_save_s", "dcp_save_s", "dcp_async_save"},
    "load": {"fastckpt_mmap", "fastckpt_read", "fastckpt_read_fallback", "fastckpt_zstd",
             "fastckpt_verified", "load_into", "verify", "torch_load", "torch_load_mmap",
             "safetensors_load", "dcp_load"},
}


def test_bench_json_and_plot(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    r = run_cli("bench", "--size", "64MiB", "--reps", "1", "--train-steps", "2", "--dir",
                tmp_path, "--json", out, "--plot", png)
    assert r.returncode == 0, r.stderr
    assert "| target | measured | met |" in r.stdout
    d = json.loads(out.read_text())
    for section, keys in BENCH_FIELDS.items():
        assert set(d[section]) == keys, section
    assert all({"cold_s", "warm_s"} <= set(v) for v in d["load"].values())
    assert d["lazy_open"]["tensors"] == 10_000 and d["lazy_open"]["cold_s"] > 0
    assert {"stall_s", "total_s"} <= set(d["save"]["dcp_async_save"])
    assert set(d["train"]["variants"]) == {"none", "fastckpt", "fastckpt_page_cache", "torch",
                                           "dcp"}
    assert all({"step_s", "overhead", "stall_s", "drain_s"} <= set(v)
               for v in d["train"]["variants"].values())
    ratio_keys = {k for k, *_ in benchmark.SAVE_TARGETS + benchmark.LOAD_TARGETS}
    assert ratio_keys <= set(d["ratios"])
    assert len(d["targets"]) == len(ratio_keys)
    assert d["nbytes"] >= 60 << 20 and d["environment"]["torch"] == torch.__version__
    assert set(os.listdir(tmp_path)) == {"bench.json", "bench.png"}  # scratch files removed

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 1000 and height >= 600 and len(data) > 50_000
