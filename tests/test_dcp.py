"""The torch.distributed.checkpoint storage plugin, in one process (the multi-rank
DTensor case runs in test_dist.py)."""

import os
import warnings

import pytest
import torch
from faults import ENOSPC, FaultyOS, always

import fastckpt
from fastckpt import writer

dcp = pytest.importorskip("torch.distributed.checkpoint", reason="needs torch.distributed")
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402

from fastckpt.dcp import Reader, Writer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # DCP: "single process"


def trained(seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(3, 16)).sum().backward()
    opt.step()
    return net, opt


def state(net, opt, step=7):
    return {"model": net.state_dict(), "opt": opt.state_dict(), "step": step,
            "extra": {"tags": ["a", 1, 2.5]}}


def assert_restored(dst, src):
    net, opt = src
    for k, v in net.state_dict().items():
        assert torch.equal(dst["model"][k], v), k
    for i, s in opt.state_dict()["state"].items():
        assert torch.equal(dst["opt"]["state"][i]["exp_avg_sq"], s["exp_avg_sq"])


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_save_load_round_trip(ckpt, compression):
    src = trained(0)
    with Writer(ckpt, compression=compression, shard_size=4096) as w:
        dcp.save(state(*src), storage_writer=w)
    assert fastckpt.verify(ckpt).ok
    dst = state(*trained(1), step=0)
    dst["extra"] = {"tags": []}
    dcp.load(dst, storage_reader=Reader(ckpt, verify=True))
    assert_restored(dst, src)
    assert dst["step"] == 7 and dst["extra"] == {"tags": ["a", 1, 2.5]}
    flat = fastckpt.load(ckpt)  # an ordinary fastckpt checkpoint: whole tensors by DCP key
    assert torch.equal(flat["model.0.weight"], src[0][0].weight.detach())


def test_async_save_snapshots(ckpt):
    src = trained(0)
    before = {k: v.clone() for k, v in src[0].state_dict().items()}
    with Writer(ckpt) as w:
        for _ in range(2):  # the second save reuses the staged buffers
            fut = dcp.async_save(state(*src), storage_writer=w)
            with torch.no_grad():
                for p in src[0].parameters():
                    p.add_(1)  # after staging: must not reach the checkpoint
            fut.result()
            src[0].load_state_dict(before)
    dst = state(*trained(1))
    dcp.load(dst, storage_reader=Reader(ckpt))
    for k, v in before.items():
        assert torch.equal(dst["model"][k], v)


@pytest.mark.parametrize("second", [
    {"t": torch.tensor([7.0]), "s": torch.ones(3)},  # t shrank: copy_ would broadcast it
    {"t": torch.arange(4.0), "s": torch.ones(3, dtype=torch.float64) / 3},  # s's dtype
    {"t": torch.arange(4.0), "s": torch.ones(2, 3)},  # s grew a dimension
])
def test_async_save_restages_a_changed_layout(tmp_path, second):
    first = {"t": torch.arange(4.0), "s": torch.ones(3)}
    with Writer(tmp_path / "a") as w:
        for name, sd in (("a", first), ("b", second)):
            dcp.async_save(sd, checkpoint_id=str(tmp_path / name), storage_writer=w).result()
    loaded = fastckpt.load(tmp_path / "b")
    for k, v in second.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def test_unsupported_dtype_is_refused_by_key(ckpt):
    with Writer(ckpt) as w, pytest.raises(CheckpointException) as info:
        dcp.save({"ok": torch.ones(2), "z": torch.ones(3, dtype=torch.complex128)},
                 storage_writer=w)
    assert "UnsupportedTypeError" in str(info.value) and "'z'" in str(info.value)
    assert not os.path.exists(ckpt)


def test_conjugate_view_is_saved_with_its_values(ckpt):
    a = torch.randn(3, dtype=torch.complex64)
    with Writer(ckpt) as w:
        dcp.save({"a": a, "c": a.conj()}, storage_writer=w)
    out = fastckpt.load(ckpt, verify=True)
    assert torch.equal(out["a"], a) and torch.equal(out["c"], a.conj().resolve_conj())


class Opaque:
    """A value only full unpickling can restore."""


def test_reader_refuses_arbitrary_pickles(ckpt):
    with Writer(ckpt) as w:
        dcp.save({"x": torch.ones(2), "obj": Opaque()}, storage_writer=w)
    dst = {"x": torch.zeros(2), "obj": None}
    with pytest.raises(CheckpointException, match="allow_pickle"):
        dcp.load(dst, storage_reader=Reader(ckpt))
    dcp.load(dst, storage_reader=Reader(ckpt, allow_pickle=True))
    assert isinstance(dst["obj"], Opaque) and torch.equal(dst["x"], torch.ones(2))


def test_failed_save_keeps_previous_checkpoint(ckpt, monkeypatch):
    src = trained(0)
    with Writer(ckpt) as w:
        dcp.save(state(*src), storage_writer=w)
        monkeypatch.setattr(writer, "os", FaultyOS(write=(ENOSPC, always)))
        with pytest.raises(CheckpointException, match="No space"):
            dcp.save(state(*trained(1)), storage_writer=w)
        monkeypatch.undo()
    dst = state(*trained(2))
    dcp.load(dst, storage_reader=Reader(ckpt))
    assert_restored(dst, src)
    assert os.listdir(os.path.dirname(ckpt)) == ["ckpt"]  # the failed save's files are gone


def test_reader_refuses_plain_checkpoints(ckpt):
    fastckpt.save({"x": torch.ones(1)}, ckpt).wait(60)
    with warnings.catch_warnings(), pytest.raises(CheckpointException, match="not written by"):
        dcp.load({"x": torch.zeros(1)}, storage_reader=Reader(ckpt))
