"""Hostile input: whatever a checkpoint's files hold, reading them raises a
``CheckpointError`` or returns, never another exception, never hangs, never reads or
writes outside the checkpoint directory, never runs code from it.

Property-based (hypothesis): valid manifests, shard headers and trees mutated at
random (keys dropped, wrong types, huge or negative numbers, long strings, deep
nesting), then parsed, opened, loaded and verified.
"""

import copy
import json
import os
import resource
import shutil
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import assert_same, sealed_manifest, write_manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastckpt
from fastckpt import manifest as mf
from fastckpt import reader, tree
from fastckpt.errors import CheckpointError, CorruptCheckpointError

EXAMPLES = {  # per target; quick ~400 in all, long ~12,000
    "quick": {"parse": 100, "manifest_file": 80, "shard": 80, "tree": 100, "keys": 15},
    "long": {"parse": 3000, "manifest_file": 3000, "shard": 3000, "tree": 3000, "keys": 100},
}
# A run that needs more memory than this for inputs of a few KiB has sized a buffer by
# a number it read.
MAX_GROWTH_KIB = 256 << 10


def fuzz(profile, target, figures, strategy):
    """Run the decorated check as a hypothesis test with the profile's example count,
    counting the examples run."""

    def wrap(check):
        @settings(max_examples=EXAMPLES[profile][target], deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def run(value):
            figures[f"fuzz.{target}"] += 1
            check(value)

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
        assert grown < MAX_GROWTH_KIB, f"peak RSS grew by {grown} KiB"

    return wrap


def only_checkpoint_errors(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except CheckpointError:
        return None


# -- hostile values and mutations ----------------------------------------------------


def deep(n, kind):
    """``n`` nested levels of a list, a tagged tuple or a tagged dict, built without
    recursion."""
    x = []
    for _ in range(n):
        x = {"list": [x], "tuple": {"$tuple": [x]}, "dict": {"$dict": [["k", x]]}}[kind]
    return x


PLAIN = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([-1, 2**31, 2**63, 2**64, 10**30, -(2**63) - 1]),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["", "../x", "/etc/passwd", "a\0b", "x" * 100_000, "$tensor", "$dict",
                     "float32", "complex128", "xxh3", "sha256", "meta", "bogus",
                     "shard-00001-of-00001.safetensors\n", "../shard-00001-of-00001.safetensors"]),
    st.lists(st.integers(min_value=-2, max_value=2**64), max_size=4),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
)
# Python stops recursing near 1,000 levels: go well past it, on both sides.
DEEP = st.builds(deep, st.integers(1, 5000), st.sampled_from(["list", "tuple", "dict"]))
HOSTILE = PLAIN | DEEP


def locations(doc, max_depth=12):
    """Every (container, key) in ``doc``, found without recursion and without
    descending into the deep values mutations plant."""
    found, stack = [], [(doc, 0)]
    while stack:
        node, d = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            found.append((node, k))
            if isinstance(v, (dict, list)) and d < max_depth:
                stack.append((v, d + 1))
    return found


@st.composite
def mutated(draw, original, values=HOSTILE):
    """``original`` with one to four mutations: a value replaced, a key dropped, a
    value wrapped in a list, or a key added."""
    doc = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 4))):
        where = locations(doc)
        if not where:
            break
        node, key = draw(st.sampled_from(where))
        action = draw(st.sampled_from(["replace", "drop", "wrap", "add"]))
        if action == "replace":
            node[key] = draw(values)
        elif action == "drop":
            del node[key]
        elif action == "wrap":
            node[key] = [node[key]]
        elif isinstance(node, dict):
            node[draw(st.text(max_size=8))] = draw(values)
        else:
            node.append(draw(values))
    return doc


# -- a valid checkpoint to mutate ----------------------------------------------------


def rich_state():
    return {
        "model": {"w": torch.randn(4, 3), "b": torch.arange(5, dtype=torch.int16),
                  "h": torch.ones(2, dtype=torch.bfloat16), "empty": torch.empty(0, 3)},
        "view": torch.arange(10.0)[2:6],
        "step": 7, "t": (1, 2.5, None), "bytes": b"\x00\x01", "dt": torch.float16,
        "size": torch.Size([2, 3]), "np": np.float32(1.5), "arr": np.arange(3),
        7: {"nan": float("nan")},
    }


@dataclass(frozen=True)
class Valid:
    """A saved checkpoint, its manifest document, its one shard's bytes, its state."""

    path: str
    doc: dict
    shard: bytes
    state: dict


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fuzz") / "ckpt")
    state = rich_state()
    state["alias"] = state["view"][1:]  # shares storage: the manifest has a view
    with fastckpt.Checkpointer() as c:
        c.save(state, path, metadata={"epoch": 1, "tags": ["a"]}).wait(timeout=60)
    with open(os.path.join(path, mf.MANIFEST_NAME)) as f:
        doc = json.load(f)
    assert len(doc["shards"]) == 1
    with open(os.path.join(path, doc["shards"][0]["file"]), "rb") as f:
        return Valid(path, doc, f.read(), state)


@pytest.fixture
def scratch(valid, tmp_path):
    """A private copy of the valid checkpoint for an example to damage."""
    dst = str(tmp_path / "ckpt")
    shutil.copytree(valid.path, dst)
    return dst


def read_everything(path):
    """Every entry point that reads a checkpoint, each allowed only CheckpointErrors."""
    only_checkpoint_errors(fastckpt.load, path)
    only_checkpoint_errors(fastckpt.load, path, mmap=False, verify=True)
    report = fastckpt.verify(path)  # never raises: damage is listed
    assert isinstance(report.problems, list)


# -- the manifest ---------------------------------------------------------------------


def test_manifest_parse(valid, profile, figures):
    @fuzz(profile, "parse", figures, mutated(valid.doc))
    def check(doc):
        only_checkpoint_errors(mf.parse, doc)


@st.composite
def manifest_bytes(draw, doc):
    """A mutated manifest, serialised, then sometimes damaged as bytes."""
    # Sealed: only damage made after the seal is the seal's to catch; the rest is the parser's.
    raw = sealed_manifest(draw(mutated(doc, PLAIN)))
    damage = draw(st.sampled_from(["none", "flip", "cut", "splice"]))
    if damage == "flip":
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([raw[i] ^ (1 << draw(st.integers(0, 7)))]) + raw[i + 1:]
    elif damage == "cut":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif damage == "splice":
        i = draw(st.integers(0, len(raw)))
        bad = draw(st.sampled_from([b"[" * 100_000, b"1" * 5000, b"\xff\xfe", b"NaN", b"\0"]))
        raw = raw[:i] + bad + raw[i:]
    return raw


def test_manifest_file(valid, scratch, profile, figures):
    manifest = os.path.join(scratch, mf.MANIFEST_NAME)

    @fuzz(profile, "manifest_file", figures, manifest_bytes(valid.doc))
    def check(raw):
        with open(manifest, "wb") as f:
            f.write(raw)
        read_everything(scratch)


@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"format": "fastckpt", "format_version": ' + b"9" * 5000 + b"}",
    b'{"format":"fastckpt","format_version":1,"checksum":null,"shards":[],"tensors":{},'
    b'"refs":[],"tree":null,"metadata":' + b'{"$tuple":[' * 5000 + b"]}" * 5000 + b"}",
], ids=["deep JSON", "5000-digit int", "deep metadata"])
def test_manifest_extremes(scratch, raw):
    with open(os.path.join(scratch, mf.MANIFEST_NAME), "wb") as f:
        f.write(raw)
    with pytest.raises(CheckpointError):
        fastckpt.load(scratch)
    assert not fastckpt.verify(scratch).ok


@pytest.mark.timeout(30)  # a blocking open() of a FIFO would hang here
@pytest.mark.parametrize("kind", ["directory", "fifo", "device"])
@pytest.mark.parametrize("victim", ["manifest", "shard"])
def test_non_regular_files_are_refused(valid, scratch, victim, kind):
    name = mf.MANIFEST_NAME if victim == "manifest" else valid.doc["shards"][0]["file"]
    where = os.path.join(scratch, name)
    os.remove(where)
    {"directory": os.mkdir, "fifo": os.mkfifo, "device": lambda p: os.symlink("/dev/zero", p)
     }[kind](where)
    with pytest.raises(CorruptCheckpointError, match="not a regular file|Is a directory"):
        fastckpt.load(scratch)
    assert not fastckpt.verify(scratch).ok


@pytest.mark.parametrize("device", ["", "bogus", "cuda:-1", "cpu:x", "x" * 10_000])
def test_malformed_device_is_refused(valid, scratch, device):
    doc = copy.deepcopy(valid.doc)
    doc["tensors"]["model/w"]["device"] = device
    write_manifest(scratch, doc)
    with pytest.raises(CorruptCheckpointError, match="bad device"):
        fastckpt.load(scratch, map_location=None)  # would restore to the saved device


# -- shard headers --------------------------------------------------------------------


def split_shard(raw):
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@st.composite
def shard_bytes(draw, raw):
    """A shard whose JSON header is mutated, with an honest or a lying length prefix
    and a data section cut short, kept or extended."""
    header, data = split_shard(raw)
    body = json.dumps(draw(mutated(header, PLAIN))).encode()
    prefix = draw(st.one_of(st.just(len(body)), st.integers(0, 2**64 - 1)))
    data = data[: draw(st.integers(0, len(data)))] + b"\0" * draw(st.sampled_from([0, 0, 8, 99]))
    return prefix.to_bytes(8, "little") + body + data


def test_shard_header(valid, scratch, profile, figures):
    doc = valid.doc
    shard_path = os.path.join(scratch, doc["shards"][0]["file"])

    @fuzz(profile, "shard", figures, shard_bytes(valid.shard))
    def check(crafted):
        with open(shard_path, "wb") as f:
            f.write(crafted)
        # The manifest agrees on the size, so the header itself is what gets parsed.
        honest = copy.deepcopy(doc)
        honest["shards"][0]["size"] = len(crafted)
        m = mf.parse(honest)
        shard = only_checkpoint_errors(reader.open_shard, scratch, m, 0)
        if shard is not None:
            shard.close()
        write_manifest(scratch, honest)
        read_everything(scratch)


def lie_consistently(path, doc, raw, name, dtype, st_dtype, shape):
    """Give tensor ``name`` another dtype and shape in the manifest and the shard header
    alike (sizes kept right), so that only the values themselves are hostile."""
    header, data = split_shard(raw)
    header[name].update(dtype=st_dtype, shape=shape)
    body = json.dumps(header).encode()
    with open(os.path.join(path, doc["shards"][0]["file"]), "wb") as f:
        f.write(len(body).to_bytes(8, "little") + body + data)
    doc = copy.deepcopy(doc)
    doc["tensors"][name].update(dtype=dtype, shape=shape)
    doc["shards"][0]["size"] = 8 + len(body) + len(data)
    write_manifest(path, doc)


@pytest.mark.parametrize("dtype, st_dtype, shape, refused", [
    ("float32", "F32", [0, 2**64], True),  # 0 bytes either way, but no tensor has such a dim
    ("complex128", "C128", [0, 3], True),  # a dtype the tree may name, no shard may hold
    ("float32", "F32", [0] + [1] * 5000, False),  # odd but possible
])
def test_consistent_lies_about_empty_tensors(valid, scratch, dtype, st_dtype, shape, refused):
    lie_consistently(scratch, valid.doc, valid.shard, "model/empty", dtype, st_dtype, shape)
    if refused:
        with pytest.raises(CorruptCheckpointError, match="model/empty"):
            fastckpt.load(scratch)
    else:
        assert fastckpt.load(scratch)["model"]["empty"].shape == tuple(shape)
    assert not fastckpt.verify(scratch).ok  # the header no longer matches its checksum


# -- the tree -------------------------------------------------------------------------

TAGS = sorted(tree._DECODERS) + ["$pickle", "$eval", "$object", "__reduce__", "$"]
LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
    st.sampled_from(["nan", "inf", "float32", "cpu", "meta", "bogus", "<f4", "|O", "V0",
                     "(2,)f4", "AAAA", "=", "cuda:0"]),
    DEEP,
)


def _grow(kids):
    return st.one_of(
        st.lists(kids, max_size=4),
        st.builds(lambda tag, p: {tag: p}, st.sampled_from(TAGS), kids),
        st.builds(lambda tag, p: {tag: p}, st.sampled_from(["$dict", "$odict"]),
                  st.lists(st.lists(kids, min_size=2, max_size=2), max_size=3)),
        st.dictionaries(st.sampled_from(TAGS) | st.text(max_size=4), kids, max_size=3),
    )


TREES = st.recursive(LEAVES, _grow, max_leaves=24)


def supply_tensor(index, tag):
    """Like the loader's: three tensors, anything else is a corrupt reference."""
    if index >= 3:
        raise CorruptCheckpointError(f"tree refers to tensor #{index} of 3")
    return torch.zeros(2).numpy() if tag == "$ndarray" else torch.zeros(2)


def test_tree_decoder(profile, figures):
    @fuzz(profile, "tree", figures, TREES)
    def check(t):
        only_checkpoint_errors(tree.unflatten, t, supply_tensor)


@pytest.mark.parametrize("node", [
    {"$pickle": "gASVAAAAAAAAAAB9lC4="}, {"__reduce__": ["os.system", ["true"]]},
    {"$object": {"module": "os", "name": "system"}}, {"$npscalar": ["|O", "AAAAAAAAAAA="]},
    {"$tensor": {"$pickle": 0}}, {"$dict": [["k", {"$eval": "1+1"}]]},
], ids=repr)
def test_unknown_or_code_bearing_tags_are_refused(node):
    with pytest.raises(CorruptCheckpointError):
        tree.unflatten(node, supply_tensor)


# -- paths and code -------------------------------------------------------------------

TRAVERSING_KEYS = ["../escape", "../../etc/passwd", "/abs/path", "a/../../b", "nul\0byte",
                   "..", ".", "shard-00001-of-00001.safetensors", "fastckpt.json", ""]


def assert_confined(path):
    """Only the checkpoint sits next to it, and it holds only its own files."""
    parent = os.path.dirname(path)
    assert os.listdir(parent) == [os.path.basename(path)]
    names = os.listdir(path)
    assert mf.MANIFEST_NAME in names
    assert all(n == mf.MANIFEST_NAME or mf._SHARD_FILE.match(n) for n in names), names


def test_traversing_tensor_names_stay_inside(tmp_path):
    path = str(tmp_path / "box" / "ckpt")
    os.makedirs(os.path.dirname(path))
    state = {k: torch.full((3,), float(i)) for i, k in enumerate(TRAVERSING_KEYS)}
    state["nested"] = {"..": {"../..": torch.ones(2)}}
    fastckpt.save(state, path).wait(timeout=60)
    assert_confined(path)
    assert_same(fastckpt.load(path, verify=True), state)


def test_generated_tensor_names_stay_inside(tmp_path, profile, figures):
    box = tmp_path / "box"

    @fuzz(profile, "keys", figures, st.lists(st.text(min_size=0, max_size=12), min_size=1,
                                             max_size=4, unique=True))
    def check(keys):
        shutil.rmtree(box, ignore_errors=True)
        os.makedirs(box)
        path = str(box / "ckpt")
        state = {k: torch.full((2,), float(i)) for i, k in enumerate(keys)}
        fastckpt.save(state, path).wait(timeout=60)
        assert_confined(path)
        assert_same(fastckpt.load(path, verify=True), state)


@pytest.mark.parametrize("name", [
    "../outside.safetensors", "../../shard-00001-of-00001.safetensors", "/tmp/x.safetensors",
    "sub/shard-00001-of-00001.safetensors", "shard-00001-of-00001.safetensors\0.txt",
    "shard-00001-of-00001.safetensors/..", "..",
])
def test_manifest_cannot_point_outside(valid, scratch, name):
    # A valid shard waits outside: following the name would load it without a complaint.
    with open(os.path.join(os.path.dirname(scratch), "outside.safetensors"), "wb") as f:
        f.write(valid.shard)
    doc = copy.deepcopy(valid.doc)
    doc["shards"][0]["file"] = name
    write_manifest(scratch, doc)
    with pytest.raises(CorruptCheckpointError, match="bad shard file name"):
        fastckpt.load(scratch)
    assert not fastckpt.verify(scratch).ok


def test_loading_never_unpickles(valid, monkeypatch):
    import pickle

    def forbidden(*_a, **_k):
        raise AssertionError("a checkpoint load reached pickle")

    for mod, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                      (torch, "load"), (np, "load")]:
        monkeypatch.setattr(mod, name, forbidden)
    assert_same(fastckpt.load(valid.path, verify=True), valid.state)
