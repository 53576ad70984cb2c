"""Checkpoint files: a crafted pickle never runs, corrupt files are named with a way out, concurrent writers and
readers never see a half-written checkpoint, and the out-dir lock keeps a second run away."""
import multiprocessing
import os

import pytest
import torch

from fastkd.recipes import checkpoints, distributed, engine
from fastkd.recipes.checkpoints import CheckpointError
from tests.conftest import RunsACommand


def _a_checkpoint(path):
    torch.save({"model": {"weight": torch.randn(64, 64)}, "epoch": 1}, path)
    return path.read_bytes()


@pytest.mark.parametrize("where", ["resume", "load_weights"])
def test_a_crafted_checkpoint_is_refused_without_running_its_code(tmp_path, where):
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"model": {}, "payload": RunsACommand(marker)}, run_dir / "last.pt")
    model = torch.nn.Linear(2, 1)
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        if where == "resume":
            engine.train(model, torch.optim.SGD(model.parameters(), lr=0.1), [], epochs=1, batch_size=1,
                         step=None, evaluate=None, run_dir=str(run_dir),
                         ctx=distributed.Context(0, 1, torch.device("cpu")))
        else:
            engine.load_weights(model, str(run_dir))
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "flipped header", "flipped end"])
def test_a_corrupt_checkpoint_is_named_with_the_way_out(tmp_path, damage):
    data = _a_checkpoint(tmp_path / "good.pt")
    damaged = {"empty": b"", "truncated": data[: len(data) // 2],
               "flipped header": data[:100] + bytes([data[100] ^ 0xFF]) + data[101:],
               "flipped end": data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:]}[damage]
    path = tmp_path / "last.pt"
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError) as error:
        checkpoints.load_trusted(str(path), hint="pass --no-resume to start over")
    message = str(error.value)
    assert str(path) in message and "--no-resume" in message and "\n" not in message


def test_a_missing_weight_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoints.load_trusted(str(tmp_path / "absent.pt"))


def _save_many(path, seed, count):
    for i in range(count):
        checkpoints.save_atomically({"writer": seed, "i": i, "data": torch.full((2000,), float(seed))}, path)


def test_concurrent_writers_and_readers_never_meet_a_broken_checkpoint(tmp_path):
    path = str(tmp_path / "last.pt")
    _save_many(path, 0, 1)
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_save_many, args=(path, seed, 60)) for seed in (1, 2)]
    for writer in writers:
        writer.start()
    reads = 0
    while any(writer.is_alive() for writer in writers) or reads < 20:
        state = checkpoints.load_trusted(path)  # raises on a torn file
        assert torch.equal(state["data"], torch.full((2000,), float(state["writer"])))
        reads += 1
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0  # no save failed
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_a_second_run_on_a_locked_out_dir_fails_at_once(tmp_path):
    with checkpoints.exclusive(str(tmp_path)):
        with pytest.raises(CheckpointError, match=f"in use by another fastkd run \\(process {os.getpid()}\\)"):
            with checkpoints.exclusive(str(tmp_path)):
                pass
    with checkpoints.exclusive(str(tmp_path)):  # released when the first run ends
        pass
