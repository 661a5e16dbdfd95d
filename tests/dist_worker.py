"""One rank of a multi-process test: ``python dist_worker.py SCENARIO RANK WORLD DIR``.

The ranks meet through a FileStore under DIR and run the scenario's function; an
assertion failure exits non-zero with its traceback. Checkpoints go under DIR.
"""

import datetime
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

import fastckpt
from fastckpt import writer
from fastckpt.dist import Sharded

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

TIMEOUT = 20.0


def model_state():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    return {f"layer{i}": t for i, t in enumerate(net.state_dict().values())}


def full_table():
    return torch.arange(10 * 6, dtype=torch.float32).reshape(10, 6)


def state(rank, world, step=1):
    return {"model": model_state(), "emb": Sharded.chunk(full_table(), 0, rank, world),
            "step": step, "tied": (model_state()["layer0"],)}


def expect_failure(handle, *words):
    try:
        handle.wait(timeout=60)
    except fastckpt.CheckpointError as e:
        assert all(w in str(e) for w in words), str(e)
        return
    raise AssertionError("the save should have failed")


def scenario_save2(rank, world, d):
    path = os.path.join(d, "ckpt")
    mine = {"rng": torch.full((3,), float(rank)), "pos": rank * 10}
    # The default group is used without naming it; while the commit runs in the
    # background, the caller's own collectives on that group go on undisturbed.
    h = fastckpt.save(state(rank, world), path, per_rank=mine, metadata={"step": 1})
    for i in range(5):
        x = torch.tensor([float(rank + i)])
        dist.all_reduce(x)
        assert x.item() == sum(r + i for r in range(world))
    h.wait(60)

    with fastckpt.Checkpointer(collective_timeout=TIMEOUT, shard_size=1024) as c:
        # One rank's write fails: every rank's save fails, the checkpoint stays.
        if rank == 1:
            real = writer.write_all
            writer.write_all = lambda fd, data: (_ for _ in ()).throw(OSError(28, "No space"))
        h = c.save(state(rank, world, step=2), path, per_rank=mine)
        expect_failure(h, "rank 1", "No space")
        if rank == 1:
            writer.write_all = real
        assert fastckpt.load(path)["step"] == 1

        # The replicated state must agree.
        expect_failure(c.save(state(rank, world, step=rank), path), "differs", "[1]")

        # A rank failing before its save gets under way keeps the ranks in step.
        bad = {"fn": print} if rank == 1 else {}
        try:
            h = c.save(state(rank, world, step=3), path, per_rank=bad)
        except fastckpt.UnsupportedTypeError:
            assert rank == 1
        else:
            expect_failure(h, "rank 1", "UnsupportedTypeError")
        r = c.save(state(rank, world, step=4), path, per_rank=mine).wait(60)
        assert r.num_tensors == 5 + 2 * world  # model, tied, a piece and rng per rank
    assert fastckpt.load(path)["step"] == 4

    # A rank that never comes to a save makes the others fail after the timeout.
    with fastckpt.Checkpointer(collective_timeout=3) as c:
        c.save(state(rank, world, step=5), path, per_rank=mine).wait(60)
        if rank == 0:
            t0 = time.monotonic()
            expect_failure(c.save(state(rank, world, step=6), path), "gone or too slow")
            assert time.monotonic() - t0 < 15
    assert fastckpt.load(path)["step"] == 5
    dist.barrier()
    leftovers = [e for e in os.listdir(d) if "fastckpt" in e]
    assert not leftovers, leftovers


def scenario_resume4(rank, world, d):
    src, path = os.path.join(d, "ckpt"), os.path.join(d, "ckpt4")
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    target = {"model": {f"layer{i}": t for i, t in enumerate(net.state_dict().values())},
              "emb": Sharded.chunk(torch.zeros(10, 6), 0, rank, world)}
    report = fastckpt.dist.load_into(src, target, strict=False)
    assert not report.missing and not report.mismatched, report
    want = state(rank, world)
    for k, v in want["model"].items():
        assert torch.equal(target["model"][k], v), k
    assert torch.equal(target["emb"].local, want["emb"].local)
    mine = fastckpt.dist.load_rank_state(src)
    assert (mine is None) == (rank >= 2), mine
    if mine is not None:
        assert mine["pos"] == rank * 10 and torch.equal(mine["rng"], torch.full((3,), rank * 1.))

    # Now split along the other dimension, on four ranks, with compression.
    big = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1))
    obj = {"model": want["model"], "big": Sharded.chunk(big, 1, rank, world), "step": 7}
    with fastckpt.Checkpointer(collective_timeout=TIMEOUT, compression="zstd") as c:
        c.save(obj, path, per_rank={"r": torch.tensor(rank)}).wait(60)


def scenario_kill(rank, world, d):
    path = os.path.join(d, "ckpt")
    victim = int(os.environ["KILL_RANK"])
    with fastckpt.Checkpointer(collective_timeout=TIMEOUT) as c:
        c.save(state(rank, world), path).wait(60)
        if rank == victim:  # dies in the middle of writing its shards
            writer.write_all = lambda fd, data: os.kill(os.getpid(), signal.SIGKILL)
        h = c.save(state(rank, world, step=2), path)
        expect_failure(h, "rank")
        assert fastckpt.load(path, verify=True)["step"] == 1
        # The group is unusable after losing a rank: later saves fail at once.
        try:
            c.save(state(rank, world, step=3), path)
        except fastckpt.CheckpointWriteError as e:
            assert "failed for good" in str(e)
        else:
            raise AssertionError("a save on a broken group should fail")
    if rank == 0:  # it removed the failed save's directory
        assert not [e for e in os.listdir(d) if "fastckpt-tmp" in e]


def scenario_dtensor(rank, world, d):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(8 * 5, dtype=torch.float32).reshape(8, 5)
    state = {"w": distribute_tensor(full, mesh, [Shard(0)]),
             "r": distribute_tensor(full[0], mesh, [Replicate()])}
    path = os.path.join(d, "dt")
    with fastckpt.Checkpointer(collective_timeout=TIMEOUT) as c:
        c.save(state, path).wait(60)
    target = {"w": distribute_tensor(torch.zeros(8, 5), mesh, [Shard(1)]),
              "r": distribute_tensor(torch.zeros(5), mesh, [Replicate()])}
    fastckpt.dist.load_into(path, target)
    assert torch.equal(target["w"].full_tensor(), full)
    assert torch.equal(target["r"].to_local(), full[0])

    # The same through torch.distributed.checkpoint with fastckpt as its storage.
    import torch.distributed.checkpoint as dcp

    from fastckpt.dcp import Reader, Writer

    path = os.path.join(d, "dcp")
    with Writer(path, shard_size=64) as w:
        dcp.save({**state, "step": 3}, storage_writer=w)
        dcp.async_save({**state, "step": 4}, storage_writer=w).result()
    target = {"w": distribute_tensor(torch.zeros(8, 5), mesh, [Shard(1)]),
              "r": distribute_tensor(torch.zeros(5), mesh, [Replicate()]), "step": 0}
    dcp.load(target, storage_reader=Reader(path, verify=True))
    assert torch.equal(target["w"].full_tensor(), full) and target["step"] == 4
    assert torch.equal(target["r"].to_local(), full[0])


def main():
    scenario, rank, world, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'store')}",
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    globals()[f"scenario_{scenario}"](rank, world, d)
    print(f"rank {rank}: ok", flush=True)
    # Exit without waiting for peers (a killed peer would make a barrier hang).
    os._exit(0)


if __name__ == "__main__":
    main()
