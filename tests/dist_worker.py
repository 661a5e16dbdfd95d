"""One rank of a multi-process test: ``python dist_worker.py SCENARIO RANK WORLD DIR``.

The ranks meet through a FileStore under DIR and run the scenario's function; an
assertion failure exits non-zero with its traceback. Checkpoints go under DIR.
"""

import datetime
import os
import signal
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

import fastckpt
from fastckpt import commit, transfer, writer
from fastckpt.catalog import INDEX_NAME, Catalog, step_name
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
        # So does a rank whose arguments are refused.
        try:
            h = c.save(state(rank, world, step=3), path,
                       compression="bogus" if rank == 1 else None)
        except ValueError:
            assert rank == 1
        else:
            expect_failure(h, "rank 1", "ValueError")
        r = c.save(state(rank, world, step=4), path, per_rank=mine).wait(60)
        assert r.num_tensors == 5 + 2 * world  # model, tied, a piece and rng per rank
    assert fastckpt.load(path)["step"] == 4
    if rank == 0:  # closing the engine waited for it to remove the step-1 checkpoint
        assert not [e for e in os.listdir(d) if "fastckpt" in e]

    # A rank that never comes to a save makes the others fail after the timeout.
    with fastckpt.Checkpointer(collective_timeout=3) as c:
        c.save(state(rank, world, step=5), path, per_rank=mine).wait(60)
        if rank == 0:
            t0 = time.monotonic()
            expect_failure(c.save(state(rank, world, step=6), path), "gone or too slow")
            assert time.monotonic() - t0 < 15
        elif rank == 1:  # comes too late, after rank 0 gave up: fails, leaves nothing
            time.sleep(5)
            try:
                h = c.save(state(rank, world, step=6), path, per_rank=mine)
            except fastckpt.CheckpointError:
                pass
            else:
                expect_failure(h)
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
        # The same layout again: staged into the buffers the last async_save kept.
        kept = w.state_dict_cache
        doubled = {k: v * 2 for k, v in state.items()}
        dcp.async_save({**doubled, "step": 5}, storage_writer=w).result()
        assert w.state_dict_cache is kept
    target = {"w": distribute_tensor(torch.zeros(8, 5), mesh, [Shard(1)]),
              "r": distribute_tensor(torch.zeros(5), mesh, [Replicate()]), "step": 0}
    dcp.load(target, storage_reader=Reader(path, verify=True))
    assert torch.equal(target["w"].full_tensor(), full * 2) and target["step"] == 5
    assert torch.equal(target["r"].to_local(), full[0] * 2)


# -- CheckpointManager on every rank ----------------------------------------------------

LOSSES = {1: 0.5, 2: 0.2, 3: 0.9, 4: 0.1, 5: 0.8, 6: 0.7}


def managed(root, c, **policy):
    """A manager over ``root`` on the ranks of the default group, found without naming
    it, keeping the last two and the two best by ``loss``."""
    return fastckpt.CheckpointManager(root, keep_last=2, keep_best=2, metric="loss",
                                      checkpointer=c, **policy)


def save_step(m, rank, world, step, loss):
    """Every rank saves ``step``. Only rank 0's metrics count: the others report the
    opposite ranking, which must change nothing."""
    return m.save(step, state(rank, world, step), metrics={"loss": loss if rank == 0 else -loss},
                  per_rank={"pos": torch.tensor([rank, step])})


def agreed(m, steps):
    """Every rank lists exactly ``steps`` (with the same details), and the root holds
    those checkpoints and the index, nothing else."""
    mine = [(i.step, i.metrics, i.checksum, i.is_best, i.is_latest) for i in m.list()]
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, mine)
    assert views == [mine] * len(views), views
    assert [v[0] for v in mine] == steps, mine
    assert sorted(os.listdir(m.root)) == sorted([INDEX_NAME] + [step_name(s) for s in steps])


def changes_made():
    """Every checkpoint removal and index write this process makes from now on."""
    made = []
    detach, write_index = transfer.detach, Catalog._write_index
    transfer.detach = lambda path: made.append(path) or detach(path)
    Catalog._write_index = lambda catalog: made.append(catalog.index_path) or write_index(catalog)
    return made


def scenario_manager(rank, world, d):
    made = changes_made()
    with fastckpt.Checkpointer(collective_timeout=TIMEOUT, shard_size=1024) as c:
        with managed(os.path.join(d, "run"), c) as m:
            for step, loss in LOSSES.items():
                save_step(m, rank, world, step, loss)
            m.wait(60)
            agreed(m, [2, 4, 5, 6])  # the last two and the best two (4, then 2)

            # One rank's write fails: the save fails on every rank, none lists the step,
            # retention removes nothing, and the step can be saved again.
            if rank == 1:
                real = writer.write_all
                writer.write_all = lambda fd, data: (_ for _ in ()).throw(OSError(28, "No space"))
            expect_failure(save_step(m, rank, world, 7, 0.05), "rank 1", "No space")
            if rank == 1:
                writer.write_all = real
            m.wait(60)
            agreed(m, [2, 4, 5, 6])
            save_step(m, rank, world, 7, 0.05).wait(60)
            m.wait(60)
            agreed(m, [4, 6, 7])

            # A save refused on one rank is refused on every rank, which stay in step.
            with pytest.raises(fastckpt.MetricError, match="rank 1"):
                m.save(8, {}, metrics={} if rank == 1 else {"loss": 0.3})
            with pytest.raises(fastckpt.InvalidArgumentError, match="different steps"):
                m.save(8 + rank, {}, metrics={"loss": 0.3})
            with pytest.raises(fastckpt.StepExistsError, match="already saved"):
                m.save(7, {}, metrics={"loss": 0.3})
            m.wait(60)
            agreed(m, [4, 6, 7])

        # Rank 0's metric decides which steps every rank saves: the others' improves
        # at every step.
        with fastckpt.CheckpointManager(os.path.join(d, "best"), save_best_only=True,
                                        metric="loss", checkpointer=c) as b:
            saved = [b.save(s, {"s": s}, metrics={"loss": loss if rank == 0 else -s}) is not None
                     for s, loss in [(1, 0.5), (2, 0.7), (3, 0.3)]]
            assert saved == [True, False, True], saved
            b.wait(60)
            agreed(b, [1, 3])

        if rank == 0:  # a manager of this process alone, in a multi-rank job
            solo = os.path.join(d, "solo")
            with fastckpt.CheckpointManager(solo, process_group=False, checkpointer=c) as s:
                s.save(1, {"w": torch.ones(2)}).wait(60)
            with fastckpt.open(os.path.join(solo, step_name(1))) as r:
                assert r.world_size is None
    assert bool(made) == (rank == 0), made  # only rank 0 changes a root


def hold_commits(flag):
    """This rank's commits wait until the file ``flag`` exists."""
    real = commit.write_file_durably

    def held(path, data):
        deadline = time.monotonic() + 30
        while not os.path.exists(flag):
            assert time.monotonic() < deadline, f"{flag} never appeared"
            time.sleep(0.01)
        real(path, data)

    commit.write_file_durably = held


def scenario_manager_resume(rank, world, d):
    """A restart of the ``manager`` scenario's run (on any number of ranks)."""
    with fastckpt.Checkpointer(collective_timeout=TIMEOUT) as c, \
            managed(os.path.join(d, "run"), c) as m:
        assert m.restore()["step"] == 7
        mine = m.restore_rank_state()
        assert (mine is None) == (rank >= 2), mine  # saved by two ranks
        if mine is not None:
            assert torch.equal(mine["pos"], torch.tensor([rank, 7]))
        assert m.restore("best")["step"] == 7 and m.restore(4)["step"] == 4
        target = {"emb": Sharded.chunk(torch.zeros(10, 6), 0, rank, world)}
        assert m.restore_into(target, 4, strict=False).loaded == 1
        assert torch.equal(target["emb"].local, Sharded.chunk(full_table(), 0, rank, world).local)

        # Every rank resumes from rank 0's pick, even while a save commits: rank 0's
        # commit of step 9 waits until the others are asking for the latest checkpoint.
        go = os.path.join(d, "go")
        if rank == 0:
            hold_commits(go)
        h = save_step(m, rank, world, 9, 0.9)
        if rank == 0:
            h.wait(60)
        else:
            threading.Timer(1.0, lambda: open(go, "a").close()).start()
        assert m.restore()["step"] == 9
        h.wait(60)
        m.wait(60)
        agreed(m, [4, 7, 9])


# -- TrainingState of a DDP run ---------------------------------------------------------

TRAIN_STEPS, SAVED_STEP = 11, 5  # 3 batches per rank and epoch: step 5 is mid-epoch


def ddp_run(rank, world, seed):
    """A DDP run whose ranks draw different random numbers (dropout, noise) and walk
    different halves of a shuffled dataset."""
    import random

    import numpy as np
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    data = torch.Generator().manual_seed(1)
    x = torch.randn(24, 4, generator=data)
    y = x.sum(1, keepdim=True)
    loader = DataLoader(TensorDataset(x, y), batch_size=4,
                        sampler=DistributedSampler(TensorDataset(x, y), world, rank, seed=2))
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.3),
                              torch.nn.Linear(16, 1))
    with torch.no_grad():  # the same initial weights on every rank, as DDP requires
        for i, p in enumerate(net.parameters()):
            p.copy_(torch.linspace(-0.5, 0.5, p.numel()).reshape(p.shape) * (i + 1))
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.Adam(ddp.parameters(), lr=0.01)
    return ddp, fastckpt.TrainingState(model=net, optimizers=[opt], loader=loader)


def train(ddp, ts, until, manager=None):
    """Train ``ts`` until step ``until``, saving step ``SAVED_STEP`` through ``manager``."""
    import random

    import numpy as np

    while ts.step < until:
        ts.loader.sampler.set_epoch(ts.epoch)
        for x, y in ts.iterate():
            x = x + 0.01 * float(np.random.randn()) + 0.01 * random.random()
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            ts.optimizers[0].zero_grad()
            loss.backward()
            ts.optimizers[0].step()
            ts.step += 1
            if manager is not None and ts.step == SAVED_STEP:
                manager.save(ts.step, ts.state_dict(rank_state=False),
                             per_rank=ts.rank_state_dict()).wait(60)
            if ts.step >= until:
                break


def draws():
    import random

    import numpy as np

    return random.random(), float(np.random.rand()), torch.rand(2).tolist()


def scenario_train(rank, world, d):
    ddp, ref = ddp_run(rank, world, seed=10)
    train(ddp, ref, TRAIN_STEPS)
    expected = ([p.clone() for p in ref.model.parameters()], draws())

    with fastckpt.CheckpointManager(os.path.join(d, "run")) as m:
        ddp, first = ddp_run(rank, world, seed=10)
        # The whole TrainingState as replicated state would keep one rank's RNGs.
        with pytest.raises(fastckpt.InvalidArgumentError, match="per_rank"):
            m.save(0, first.state_dict())
        train(ddp, first, SAVED_STEP + 2, manager=m)

        ddp, resumed = ddp_run(rank, world, seed=50)  # as a fresh process would start
        resumed.load_state_dict(m.restore(), rank_state=m.restore_rank_state())
        assert (resumed.step, resumed.epoch, resumed.batch_index) == (SAVED_STEP, 1, 2)
        train(ddp, resumed, TRAIN_STEPS)
    params = list(resumed.model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(expected[0], params, strict=True))
    assert draws() == expected[1]  # this rank's own generators went on where it left off


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
