"""Round trips through save/load: every supported type, dtype, layout and aliasing."""

import collections
import glob
import math
import os

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import assert_same, bits

import fastckpt
from fastckpt.plan import ST_DTYPES

DTYPES = sorted(ST_DTYPES, key=str)


def _rand(dtype, shape=(5, 7)):
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -1000), min(info.max, 1000)
    return torch.randint(lo, hi, shape, dtype=torch.int64).to(dtype)


def roundtrip(obj, path, **load_kw):
    fastckpt.save(obj, path).wait(timeout=60)
    return fastckpt.load(path, **load_kw)


def test_plain_values_round_trip(ckpt):
    obj = {
        "none": None, "t": True, "f": False, "i": -(2**63), "big": 2**100, "s": "héllo",
        "float": 0.1, "nan": math.nan, "inf": math.inf, "ninf": -math.inf, "neg0": -0.0,
        "bytes": b"\x00\xff\x10", "dtype": torch.bfloat16, "size": torch.Size([2, 3]),
        "device": torch.device("cpu"), "tuple": (1, (2, [3, {"x": 4}])), "list": [],
        "int_keys": {0: "a", 1: "b", -5: "c"}, "tuple_key": {(1, 2): 3},
        "mixed_keys": {1: "int", "1": "str", 1.5: "float", None: "none", False: "bool"},
        "od": collections.OrderedDict([("b", 1), ("a", 2)]),
        "np_scalars": [np.float32(1.5), np.int64(-3), np.bool_(True), np.float64(math.nan)],
        "ndarray": np.arange(12, dtype=np.int16).reshape(3, 4),
        "ndarray_f": np.random.rand(2, 2),
        "$dict": {"$tuple": "user keys that look like tags stay keys"},
    }
    out = roundtrip(obj, ckpt)
    assert_same(obj, out)
    assert math.copysign(1.0, out["neg0"]) == -1.0
    assert isinstance(out["od"], collections.OrderedDict)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype(ckpt, dtype):
    obj = {"x": _rand(dtype), "scalar": _rand(dtype, ()), "empty": _rand(dtype, (0, 3))}
    for mmap in (True, False):
        assert_same(obj, roundtrip(obj, ckpt, mmap=mmap))


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_empty_tensors_beside_others_verify(ckpt, compression):
    """An empty tensor lies at the offset where the next one starts: the shard
    checksum must come out the same for the writer and for every reader."""
    obj = {"x": torch.ones(3, dtype=torch.int16), "e": torch.empty(0),
           "w": torch.randn(1 << 16), "e8": torch.empty(0, 2, dtype=torch.float64),
           "b": torch.ones(5, dtype=torch.bool), "eb": torch.empty(0, dtype=torch.uint8)}
    fastckpt.save(obj, ckpt, compression=compression).wait(timeout=60)
    report = fastckpt.verify(ckpt)
    assert report.ok, report.problems
    assert_same(obj, fastckpt.load(ckpt, verify=True))


def test_special_float_values_are_bit_exact(ckpt):
    x = torch.tensor([math.nan, -math.nan, math.inf, -0.0, 1e-45], dtype=torch.float32)
    assert torch.equal(bits(roundtrip({"x": x}, ckpt)["x"]), bits(x))


def test_non_contiguous_views(ckpt):
    base = torch.randn(6, 8)
    obj = {
        "t": torch.randn(4, 5).t(),
        "stride": torch.randn(10)[::3],
        "expanded": torch.randn(3, 1).expand(3, 4),
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "cols": base[:, 2:5],
    }
    out = roundtrip(obj, ckpt)
    for k in obj:
        assert torch.equal(out[k], obj[k]), k


def test_tied_and_viewed_tensors_share_storage(ckpt):
    w = torch.randn(16, 8)
    obj = {"embed": w, "lm_head": w, "half": w[:8], "row": w[3]}
    out = roundtrip(obj, ckpt)
    for k in obj:
        assert torch.equal(out[k], obj[k])
    ptr = out["embed"].untyped_storage().data_ptr()
    assert all(out[k].untyped_storage().data_ptr() == ptr for k in obj)
    out["embed"][3, 0] = 123.0
    assert out["row"][0] == 123.0 and out["lm_head"][3, 0] == 123.0
    m = fastckpt.manifest.read(ckpt)
    assert len(m.tensors) == 1 and m.nbytes == w.numel() * 4  # written once


def test_conjugate_and_negative_views_keep_their_values(ckpt):
    """A lazy conjugate or negation shares its storage with a tensor of other values:
    each must come back with its own values, also when saved beside its base."""
    a = torch.randn(3, dtype=torch.complex64)
    obj = {"a": a, "c": a.conj(), "neg": a.conj().imag, "im": a.imag,
           "lone": torch.randn(4, dtype=torch.complex64).conj()}
    out = roundtrip(obj, ckpt)
    for k, v in obj.items():
        assert torch.equal(out[k], v.resolve_conj().resolve_neg()), k
        assert not (out[k].is_conj() or out[k].is_neg()), k


def test_numpy_arrays_keep_shape_and_shared_buffers(ckpt):
    arr = np.arange(10, dtype=np.float32)
    obj = {"head": arr[:2], "all": arr, "zero_d": np.array(5.0), "flag": np.array(True),
           "t": np.arange(6, dtype=np.int32).reshape(2, 3).T}
    out = roundtrip(obj, ckpt)
    for k, v in obj.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype, k
        np.testing.assert_array_equal(out[k], v)


def test_keys_whose_paths_coincide(ckpt):
    """'a/b' and 'a' -> 'b' (or 0 and '0') spell one key path: load restores both, and
    reading either by that path is refused rather than answered with one of them."""
    obj = {"a/b": torch.full((3,), 1.0), "a": {"b": torch.full((3,), 2.0)},
           0: torch.zeros(2), "0": torch.ones(2), "c": torch.arange(3)}
    assert_same(obj, roundtrip(obj, ckpt))
    with fastckpt.open(ckpt) as r:
        assert r.ambiguous == {"a/b", "0"}
        assert r.keys() == ["c"] and "a/b" not in r and len(r) == 1
        for key in ("a/b", "0"):
            with pytest.raises(fastckpt.CheckpointError, match="names several tensors"):
                r[key]
        assert torch.equal(r["c"], obj["c"])


def test_model_and_optimizer_state(ckpt):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    sched.step()
    obj = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
           "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(), "step": 1}
    out = roundtrip(obj, ckpt)
    assert_same(obj, out)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(out["opt"])
    model.load_state_dict(out["model"])


def test_stock_safetensors_reads_every_shard(tmp_path):
    obj = {f"w{i}": torch.randn(256, 256) for i in range(6)}  # 256 KiB each
    path = os.path.join(tmp_path, "ck")
    with fastckpt.Checkpointer(shard_size=600 << 10) as c:
        c.save(obj, path).wait(timeout=60)
    shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    assert len(shards) == 3
    seen = {}
    for f in shards:
        seen.update(safetensors.torch.load_file(f))
    assert set(seen) == set(obj)
    for k in obj:
        assert torch.equal(seen[k], obj[k])


def test_mmap_load_is_zero_copy_and_writable(ckpt):
    x = torch.randn(1024, 256)
    out = roundtrip({"x": x}, ckpt, mmap=True)["x"]
    out.add_(1)  # private mapping: writable, and the file stays untouched
    assert torch.equal(fastckpt.load(ckpt)["x"], x)
    assert fastckpt.verify(ckpt).ok


def test_metadata_is_stored(ckpt):
    fastckpt.save({"x": torch.ones(1)}, ckpt, metadata={"step": 7, "loss": math.nan}).wait()
    meta = fastckpt.manifest.read(ckpt).metadata
    assert meta["step"] == 7 and math.isnan(meta["loss"])


@pytest.mark.parametrize("kind", ["xxh3", "sha256", None])
def test_checksum_kinds(ckpt, kind):
    obj = {"x": torch.randn(100)}
    fastckpt.save(obj, ckpt, checksum=kind).wait()
    assert torch.equal(fastckpt.load(ckpt, verify=kind is not None)["x"], obj["x"])
    assert fastckpt.verify(ckpt).ok == (kind is not None)


def test_map_location(ckpt):
    obj = {"x": torch.randn(3)}
    fastckpt.save(obj, ckpt).wait()
    assert fastckpt.load(ckpt, map_location=None)["x"].device.type == "cpu"
    assert fastckpt.load(ckpt, map_location={"cuda:0": "cpu"})["x"].device.type == "cpu"
    assert fastckpt.load(ckpt, map_location=torch.device("cpu"))["x"].device.type == "cpu"


@pytest.mark.parametrize("where, error", [
    (lambda storage, loc: storage, TypeError),
    ("gpu0", ValueError),
    ("meta", ValueError),
    (0 if not torch.cuda.is_available() else "meta", ValueError),
    ({"cpu": "cuda:7"} if not torch.cuda.is_available() else {"cpu": "meta"}, ValueError),
])
def test_bad_map_location_is_refused_before_reading(ckpt, where, error):
    fastckpt.save({"x": torch.ones(2)}, ckpt).wait(timeout=60)
    with pytest.raises(error, match="map_location"):
        fastckpt.load(ckpt, map_location=where)
    with fastckpt.open(ckpt) as r, pytest.raises(error, match="map_location"):
        r.load(where)


def test_a_closed_reader_reads_no_more(ckpt):
    fastckpt.save({"x": torch.ones(2), "y": torch.zeros(3)}, ckpt).wait(timeout=60)
    with fastckpt.open(ckpt) as r:
        x = r["x"]
    assert torch.equal(x, torch.ones(2))  # what was read stays valid
    with pytest.raises(fastckpt.CheckpointError, match="closed"):
        r["y"]


@pytest.mark.parametrize("obj, metadata, match", [
    ({"d": torch.float8_e4m3fnuz}, None, "dtype torch.float8_e4m3fnuz at 'd'"),
    ({"x": 1}, "step=1", "metadata must be a mapping"),
])
def test_bad_values_are_refused_at_save_time(ckpt, obj, metadata, match):
    with pytest.raises(TypeError, match=match):
        fastckpt.save(obj, ckpt, metadata=metadata)
    assert not os.path.exists(ckpt)
