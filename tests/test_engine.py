"""The shared training engine: resume after an interruption (and only with the same settings), named loss terms,
non-finite guard, accumulation, clipping, evaluation period, TensorBoard, DDP on CPU (buffers, resume, timeout)."""
import json
import math
import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from fastkd.recipes import distributed, engine
from fastkd.recipes.config import ConfigError
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


CPU = distributed.Context(0, 1, torch.device("cpu"))


def _train(run_dir, step, *, epochs=2, evaluate=None, model=None, batch_size=16, **options):
    torch.manual_seed(0)
    model = model or torch.nn.Linear(5, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    history = engine.train(model, optimizer, _problem(), epochs=epochs, batch_size=batch_size, step=step,
                           evaluate=evaluate or (lambda net: {}), run_dir=str(run_dir), ctx=CPU, seed=1, **options)
    return model, history


def _bce(net, batch, epoch):
    x, y = batch
    return torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)


def test_resume_refuses_other_settings_and_names_them(tmp_path):
    _train(tmp_path, _bce, config={"lr": 0.1, "seed": 1})
    with pytest.raises(ConfigError) as error:
        _train(tmp_path, _bce, config={"lr": 0.2, "seed": 1})
    assert "lr 0.1 -> 0.2" in str(error.value) and "seed" not in str(error.value)
    assert "--no-resume" in str(error.value)
    with pytest.raises(ConfigError, match="epochs 2 -> 3"):  # a longer schedule is refused, not half-applied
        _train(tmp_path, _bce, epochs=3, config={"lr": 0.1, "seed": 1})
    _, history = _train(tmp_path, _bce, epochs=3, config={"lr": 0.1, "seed": 1}, resume=False)  # starts over
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def _terms_with_nan_at(epoch_and_batch):
    seen = {"epoch": None, "batch": 0}

    def step(net, batch, epoch):
        seen["batch"] = seen["batch"] + 1 if seen["epoch"] == epoch else 1
        seen["epoch"] = epoch
        bce = _bce(net, batch, epoch)
        mld = net(batch[0]).square().mean()
        if (epoch + 1, seen["batch"]) == epoch_and_batch:
            mld = mld * float("nan")
        return {"bce": bce, "mld": mld}
    return step


def test_a_nonfinite_loss_stops_the_run_naming_the_term_and_the_step(tmp_path):
    with pytest.raises(engine.NonFiniteLossError) as error:
        _train(tmp_path, _terms_with_nan_at((2, 3)), name="student")
    message = str(error.value)
    assert "student" in message and "epoch 2, batch 3" in message and "mld nan" in message
    assert "bce" in message and "--on-nonfinite skip" in message
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1  # the last good epoch is kept


def test_skipping_nonfinite_steps_counts_them_and_keeps_the_weights_finite(tmp_path):
    model, history = _train(tmp_path, _terms_with_nan_at((2, 3)), on_nonfinite="skip")
    assert [h["skipped_steps"] for h in history] == [0, 1]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert set(history[0]) >= {"train_loss", "train_bce", "train_mld"}  # named terms, per epoch


def test_nonfinite_metrics_are_written_as_valid_json(tmp_path):
    _train(tmp_path, _bce, evaluate=lambda net: {"mAP": float("nan"), "AP": [float("inf"), 1.0]})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["mAP"] is None and records[-1]["AP"] == [None, 1.0]


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    big, _ = _train(tmp_path / "big", _bce, batch_size=16)
    accumulated, _ = _train(tmp_path / "accumulated", _bce, batch_size=8, accumulate_steps=2)
    for a, b in zip(big.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_gradient_clipping_bounds_each_step(tmp_path):
    torch.manual_seed(0)
    start = [p.detach().clone() for p in torch.nn.Linear(5, 1).parameters()]
    model, _ = _train(tmp_path, lambda net, batch, epoch: 1000 * _bce(net, batch, epoch), epochs=1, grad_clip=0.01)
    moved = torch.cat([(p.detach() - s).flatten() for p, s in zip(model.parameters(), start)]).norm()
    assert moved <= 4 * 0.1 * 0.01 + 1e-6  # 4 SGD steps of lr 0.1, each gradient clipped to norm 0.01


def test_evaluation_every_k_epochs_and_after_the_last(tmp_path):
    _, history = _train(tmp_path, _bce, epochs=5, eval_every=2, evaluate=lambda net: {"accuracy": 1.0})
    assert ["accuracy" in h for h in history] == [False, True, False, True, True]


def test_loss_terms_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _train(tmp_path, _terms_with_nan_at(None), evaluate=lambda net: {"accuracy": 0.5})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"step/train_bce", "step/train_mld", "epoch/train_loss", "epoch/accuracy"} <= tags
    assert len(events.Scalars("step/train_loss")) == 2 * 4  # every optimizer step of 2 epochs


def test_batches_of_any_structure_reach_the_device():
    batch = {"images": [torch.ones(2)], "boxes": ({"xyxy": torch.zeros(1, 4)},), "ids": ["a"]}
    moved = distributed.to_device(batch, torch.device("cpu"))
    assert moved["ids"] == ["a"] and isinstance(moved["boxes"], tuple)
    assert torch.equal(moved["boxes"][0]["xyxy"], torch.zeros(1, 4))


class _WithBuffersAndDropout(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                       torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x)


def _ddp_fit(rank, world, port, run_dir, epochs, fail_at_epoch):
    torchrun_environment(rank, world, port)
    ctx = distributed.init("cpu")
    torch.manual_seed(0)
    model = _WithBuffersAndDropout()
    torch.manual_seed(100 + rank)  # each rank draws its own dropout masks

    def step(net, batch, epoch):
        if epoch == fail_at_epoch:
            raise KeyboardInterrupt("killed")
        return _bce(net, batch, epoch)

    def evaluate(net):
        x, y = _problem().tensors
        return {"loss": torch.nn.functional.binary_cross_entropy_with_logits(net(x), y).item()}

    try:
        history = engine.train(model, torch.optim.Adam(model.parameters(), lr=0.05), _problem(), epochs=epochs,
                               batch_size=8, step=step, evaluate=evaluate, run_dir=run_dir, ctx=ctx, seed=1)
        torch.save({"state": model.state_dict(), "history": history}, os.path.join(run_dir, f"rank{rank}.pt"))
    except KeyboardInterrupt:
        pass
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_buffers_agree_across_ranks_and_a_killed_run_resumes_identically(tmp_path):
    for run, fail_at in (("straight", None), ("killed", 1)):
        mp.spawn(_ddp_fit, args=(2, free_port(), str(tmp_path / run), 3, fail_at), nprocs=2)
    assert not (tmp_path / "killed" / "rank0.pt").exists()
    mp.spawn(_ddp_fit, args=(2, free_port(), str(tmp_path / "killed"), 3, None), nprocs=2)
    results = {run: [torch.load(tmp_path / run / f"rank{r}.pt", weights_only=True) for r in range(2)]
               for run in ("straight", "killed")}
    for run in results.values():  # BatchNorm statistics (and everything else) equal on both ranks
        for key, value in run[0]["state"].items():
            torch.testing.assert_close(run[1]["state"][key], value, rtol=0, atol=0)
    reloaded = _WithBuffersAndDropout()  # the checkpoint is the model every rank evaluated
    assert engine.load_weights(reloaded, str(tmp_path / "straight"))
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, results["straight"][0]["state"][key], rtol=0, atol=0)
    for key, value in results["straight"][0]["state"].items():  # killed + resumed = uninterrupted
        torch.testing.assert_close(results["killed"][0]["state"][key], value, rtol=0, atol=0)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in results["straight"][0]["history"]]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in results["killed"][0]["history"]] == strip


def _stalled_rank(rank, world, port, timeout_s, result_path):
    torchrun_environment(rank, world, port)
    ctx = distributed.init("cpu", timeout_s=timeout_s)
    if rank == 1:
        time.sleep(3 * timeout_s)  # a rank that stopped responding
        return
    began = time.time()
    try:
        torch.distributed.barrier()
        outcome = "returned"
    except RuntimeError:
        outcome = "raised"
    with open(result_path, "w") as f:
        json.dump({"outcome": outcome, "seconds": time.time() - began, "world": ctx.world_size}, f)


def test_a_stalled_rank_fails_the_run_after_the_collective_timeout(tmp_path):
    result = tmp_path / "rank0.json"
    mp.spawn(_stalled_rank, args=(2, free_port(), 2.0, str(result)), nprocs=2)
    outcome = json.loads(result.read_text())
    assert outcome["outcome"] == "raised" and outcome["seconds"] < 5.5  # not torch's default of 30 minutes


def test_iteration_schedules():
    from fastkd.recipes.schedules import lr_schedule
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    schedule = lr_schedule("warmup-multistep", optimizer, 10, warmup_steps=4, warmup_factor=0.2,
                           milestones=(6, 8), gamma=0.5)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25])
    assert lr_schedule("constant", optimizer, 10) is None
    onecycle, peaks = lr_schedule("onecycle", optimizer, 10, peak_lr=2.0), []
    for _ in range(10):
        peaks.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        onecycle.step()
    assert peaks[0] == pytest.approx(2.0 / 25) and max(peaks) == pytest.approx(2.0) and peaks[-1] < 0.01
    for kind, expected in (("cosine", [(1 + math.cos(math.pi * t / 4)) / 2 for t in range(5)]),
                           ("poly", [(1 - t / 4) ** 0.9 for t in range(5)])):
        optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
        decay, rates = lr_schedule(kind, optimizer, 4), []
        for _ in range(5):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            decay.step()
        assert rates == pytest.approx(expected)
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_schedule("cyclic", optimizer, 10)
