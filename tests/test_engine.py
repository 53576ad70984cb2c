"""The shared training engine: resume after an interruption, atomic checkpoints, DDP on CPU."""
import json
import os

import torch
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from fastkd.recipes import distributed, engine
from tests.conftest import free_port, torchrun_environment


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=gen)
    y = (x @ torch.randn(5, 1, generator=gen) > 0).float()
    return TensorDataset(x, y)


def _fit(run_dir, epochs, ctx, fail_at_epoch=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)

    def step(net, batch, epoch):
        if epoch == fail_at_epoch:
            raise KeyboardInterrupt("killed")
        x, y = batch
        return torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)

    def evaluate(net):
        x, y = _problem().tensors
        return {"accuracy": ((net(x) > 0).float() == y).float().mean().item()}

    history = engine.train(model, optimizer, _problem(), epochs=epochs, batch_size=16, step=step, evaluate=evaluate,
                           run_dir=str(run_dir), ctx=ctx, seed=1)
    return model, history


def test_an_interrupted_run_resumes_without_losing_finished_epochs(tmp_path):
    ctx = distributed.Context(0, 1, torch.device("cpu"))
    straight, straight_history = _fit(tmp_path / "straight", 4, ctx)
    try:
        _fit(tmp_path / "killed", 4, ctx, fail_at_epoch=2)
    except KeyboardInterrupt:
        pass
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["epoch"] == 2
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "killed"))
    resumed, history = _fit(tmp_path / "killed", 4, ctx)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    log = (tmp_path / "killed" / "train.log").read_text().splitlines()
    assert [line.split("epoch ")[1][:3] for line in log] == ["1/4", "2/4", "3/4", "4/4"] and "accuracy" in log[0]
    assert [h["accuracy"] for h in history] == [h["accuracy"] for h in straight_history]


def _ddp_worker(rank, world, port, run_dir):
    torchrun_environment(rank, world, port)
    ctx = distributed.init("cpu")
    model, _ = _fit(run_dir, 2, ctx)
    gathered = distributed.gather_rows(torch.arange(rank + 2)[:, None], ctx)
    torch.save({"weight": model.weight.detach(), "gathered": gathered}, os.path.join(run_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ddp_on_cpu_keeps_ranks_in_sync(tmp_path):
    port = free_port()
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    torch.testing.assert_close(rank0["weight"], rank1["weight"])
    assert rank0["gathered"].flatten().tolist() == [0, 1, 0, 1, 2]  # variable lengths, no duplicates
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2
