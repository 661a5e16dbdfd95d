import collections
import json
import os

import pytest
import torch

# Counts the reliability harnesses report (kills survived, faults injected, flips
# detected, ...), printed at the end of the run and written out by --figures.
FIGURES: collections.Counter = collections.Counter()


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run the long (slow) profile")
    parser.addoption("--figures", metavar="PATH", help="write the reliability figures as JSON")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = pytest.mark.skip(reason="long profile: run with --run-slow (make stress)")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)


def pytest_terminal_summary(terminalreporter, config):
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for key in sorted(FIGURES):
        terminalreporter.write_line(f"{key}: {FIGURES[key]}")
    path = config.getoption("--figures")
    if path:
        with open(path, "w") as f:
            json.dump(dict(sorted(FIGURES.items())), f, indent=1)


@pytest.fixture(scope="session")
def figures():
    """The run's reliability counters: ``figures[key] += n``."""
    return FIGURES


@pytest.fixture(params=["quick", pytest.param("long", marks=pytest.mark.slow)])
def profile(request):
    """Which profile a harness runs: "quick" in every run, "long" with --run-slow."""
    return request.param


@pytest.fixture(params=["native", "fallback"])
def impl(request, monkeypatch):
    """Runs the test with the C++ extension, then with the pure-Python fallback."""
    from fastckpt import fileio

    if request.param == "native":
        if fileio._native is None:
            pytest.skip("fastckpt._native is not built (no compiler at install time)")
        monkeypatch.delenv("FASTCKPT_NO_NATIVE", raising=False)
    else:
        monkeypatch.setenv("FASTCKPT_NO_NATIVE", "1")
    assert fileio.native_available() == (request.param == "native")
    return request.param


@pytest.fixture
def ckpt(tmp_path):
    """A fresh checkpoint path inside the test's directory."""
    return os.path.join(tmp_path, "ckpt")


@pytest.fixture
def engine():
    from fastckpt import Checkpointer

    with Checkpointer(workers=2, staging_budget=64 << 20) as c:
        yield c


def sealed_manifest(doc, reseal=True):
    """A manifest document as file bytes. ``reseal``: with a fresh ``manifest_checksum``,
    as a hostile or buggy writer would make it, so that the parser's own checks must
    catch what is wrong; otherwise the bytes stand for damage on disk."""
    import json

    from fastckpt.checksum import KINDS
    from fastckpt.manifest import seal

    if reseal and isinstance(doc, dict):
        doc = {k: v for k, v in doc.items() if k != "manifest_checksum"}
        if doc.get("checksum") in KINDS:
            try:
                return seal(doc)
            except ValueError:  # NaN: strict JSON refuses it, the plain dump below won't
                pass
    return json.dumps(doc).encode()


def write_manifest(path, doc, reseal=True):
    """Replace checkpoint ``path``'s manifest by ``doc`` (see :func:`sealed_manifest`)."""
    from fastckpt.manifest import MANIFEST_NAME

    with open(os.path.join(path, MANIFEST_NAME), "wb") as f:
        f.write(sealed_manifest(doc, reseal))


def edit_manifest(path, fn, reseal=True):
    """Rewrite checkpoint ``path``'s manifest through ``fn(doc)`` (see
    :func:`sealed_manifest` for ``reseal``)."""
    import json

    from fastckpt.manifest import MANIFEST_NAME

    with open(os.path.join(path, MANIFEST_NAME)) as f:
        doc = json.load(f)
    fn(doc)
    write_manifest(path, doc, reseal)


def skip_without_direct_io(path):
    """Skip the test where the filesystem holding ``path`` refuses O_DIRECT."""
    from fastckpt import fileio

    os.makedirs(path, exist_ok=True)
    if not fileio.direct_io_supported(path):
        pytest.skip(f"the filesystem holding {path} refuses O_DIRECT")


def huge_page_eligible(address):
    """Whether the kernel may back the mapping holding ``address`` with transparent
    huge pages (``THPeligible`` in /proc/self/smaps). Skips the test where transparent
    huge pages are off or the kernel does not report the field."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                pytest.skip("transparent huge pages are off on this kernel")
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        pytest.skip("no transparent huge pages or /proc/self/smaps here")
    inside = False
    for line in lines:
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "THPeligible:":
            return line.split()[1] == "1"
    pytest.skip("/proc/self/smaps has no THPeligible field")


def shards(path):
    """A checkpoint's shard files, in name order."""
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))


def data_start(path):
    """Where a safetensors file's data section begins."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def flip_bit(path, offset, bit=0):
    """Flip one bit of a file in place (flipping it again undoes it)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


def bits(t):
    """A tensor's raw bytes, so that equality is bitwise (NaN == NaN, -0.0 != 0.0)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a, b):
    """Deep equality: same types, same tensor dtypes/shapes/bits."""
    import numpy as np

    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(bits(a), bits(b))
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys())
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, float) and a != a:
        assert b != b
    else:
        assert a == b
