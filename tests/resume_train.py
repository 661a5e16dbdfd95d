"""A small training run for test_resume.py, executed as its own process.

Trains an MLP with dropout on synthetic data from a seeded, shuffled DataLoader,
checkpointing through a CheckpointManager every ``every`` steps and printing
``committed <step>`` once each checkpoint is durable. If the manager already holds a
checkpoint it resumes from the latest one. Writes the final parameters to ``out``.
With ``--wait`` it builds everything, then waits for a line on stdin before it
opens the checkpoint directory (so its start-up can overlap another run's).

usage: resume_train.py ROOT OUT TOTAL_STEPS EVERY STEP_DELAY_S [--wait]
"""

import random
import sys
import time

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

import fastckpt


def build():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    data = torch.Generator().manual_seed(1)
    x = torch.randn(56, 8, generator=data)  # 7 batches of 8 per epoch
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(56, 1, generator=data)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(2))
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    return fastckpt.TrainingState(model=model, optimizers=[opt], schedulers=[sched],
                                  loader=loader, config={"lr": 0.01, "batch_size": 8})


def report(pending):
    """Print the steps whose checkpoints have committed; return the rest."""
    left = []
    for step, handle in pending:
        if handle.done():
            handle.wait()
            print(f"committed {step}", flush=True)
        else:
            left.append((step, handle))
    return left


def main(root, out, total, every, delay, wait=False):
    torch.set_num_threads(1)
    ts = build()
    opt, sched = ts.optimizers[0], ts.schedulers[0]
    if wait:
        sys.stdin.readline()
    with fastckpt.CheckpointManager(root, keep_last=2) as manager:
        if manager.latest() is not None:
            ts.load_state_dict(manager.restore())
            print(f"resumed {ts.step}", flush=True)
        pending = []
        while ts.step < total:
            for x, y in ts.iterate():
                # Noise from NumPy's and Python's global generators: they must resume too.
                x = x + 0.01 * float(np.random.randn()) + 0.01 * random.random()
                loss = torch.nn.functional.mse_loss(ts.model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                ts.step += 1
                if ts.step % every == 0:
                    h = manager.save(ts.step, ts.state_dict(), metrics={"loss": loss.item()})
                    pending.append((ts.step, h))
                pending = report(pending)
                time.sleep(delay)
                if ts.step >= total:
                    break
        manager.wait(timeout=60)
        report(pending)
    save_file({k: v.contiguous() for k, v in ts.model.state_dict().items()}, out)


if __name__ == "__main__":
    root, out, total, every, delay = sys.argv[1:6]
    main(root, out, int(total), int(every), float(delay), wait="--wait" in sys.argv[6:])
