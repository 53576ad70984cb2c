"""The MLTr recipe: a training step of each rung, the CLI's ladder and report, a real (image-list) dataset,
resume after a kill, DDP with 2 CPU processes; MITr as the L2D teacher and student backbone."""
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("sklearn")
import fastkd  # noqa: E402
from fastkd.data import CanvasConfig, DigitCanvases  # noqa: E402
from fastkd.models import build_backbone  # noqa: E402
from fastkd.models.deeplab import split_backbone  # noqa: E402
from fastkd.recipes import cli, distributed, engine, l2d, mltr  # noqa: E402
from tests.conftest import free_port, ranks_that_agree, torchrun_environment, without_seconds  # noqa: E402
from tests.test_l2d_recipe import _write_image_list  # noqa: E402

SMALL = dict(canvas=CanvasConfig(size=32, digit_sizes=(12, 16), max_digits=3, grid=2))
SMOKE = ["--preset", "smoke", "--train-samples", "32", "--test-samples", "16", "--batch-size", "16"]


@pytest.mark.parametrize("rung", list(mltr.LADDER))
def test_each_rung_takes_a_step_with_its_terms(rung):
    cfg = mltr.config_with(**SMALL)
    data = DigitCanvases("train", 8, cfg.canvas)
    torch.manual_seed(0)
    model = mltr.build_model(rung, cfg, 10, 1)
    images, targets = data.images, data.targets
    terms = mltr.make_step(cfg, torch.device("cpu"))(model, (images, targets), 0)
    logits, count_logits = model(images)
    assert set(terms) == ({"asl", "count"} if rung == "count-token" else {"asl"})
    torch.testing.assert_close(terms["asl"], fastkd.asymmetric_loss(logits, targets))
    if "count" in terms:
        torch.testing.assert_close(terms["count"], cfg.count_weight * fastkd.object_count_loss(count_logits, targets))
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in model.parameters())  # every part of the rung is trained


def test_cli_prints_the_ladder_and_writes_the_report(tmp_path, capsys):
    cli.main(["mltr", *SMOKE, "--out-dir", str(tmp_path), "--rungs", "window,count-token"])
    out = capsys.readouterr().out
    assert "| window |" in out and "| + count-token |" in out and "mAP vs the rung above" in out
    report = json.loads((tmp_path / "results.json").read_text())
    last = report["histories"]["count-token"][-1]
    assert {"mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "count_accuracy"} <= set(last)
    assert "count_accuracy" not in report["histories"]["window"][-1]
    known = [ap for ap in last["AP_per_class"] if ap is not None]
    assert sum(known) / len(known) == pytest.approx(last["mAP"])
    assert (tmp_path / "results.png").exists() and (tmp_path / "count-token" / "last.pt").exists()


def test_bad_options_are_named(capsys):
    for argv, message in ((["--rungs", "window,swin"], "unknown ['swin']"),
                          (["--cross-heads", "3"], "--cross-heads 3 must divide window^2 = 16"),
                          (["--canvas-size", "8"], "image_size must be >= 32"),
                          (["--canvas-size", "24", "--patch", "2", "--canvas-digit-sizes", "8,12", "--canvas-grid",
                            "1"], "max_digits 4 needs a grid of at least that many cells"),
                          (["--patch", "0"], "--patch")):
        with pytest.raises(SystemExit):
            cli.main(["mltr", *argv])
        assert message in capsys.readouterr().err


def test_real_dataset(tmp_path):
    _write_image_list(tmp_path, "train", 8)
    _write_image_list(tmp_path, "test", 4)
    cli.main(["mltr", "--dataset", "image-list", "--data-root", str(tmp_path), "--image-size", "16",
              "--patch", "2", "--num-workers", "0", "--epochs", "1", "--batch-size", "4", "--rungs", "count-token",
              "--out-dir", str(tmp_path / "run")])
    state = torch.load(tmp_path / "run" / "count-token" / "last.pt", weights_only=True)["model"]
    assert state["encoder.patch_embed.weight"].shape[1] == 3 and state["count_head.1.weight"].shape[0] == 4


def test_a_killed_ladder_resumes_where_it_stopped(tmp_path, monkeypatch):
    common = ["mltr", *SMOKE, "--epochs", "2", "--rungs", "window,count-token"]
    cli.main(common + ["--out-dir", str(tmp_path / "straight")])
    original_step = mltr.make_step
    calls = {"n": 0}

    def step_killed_in_the_second_rung(cfg, device):
        step = original_step(cfg, device)
        calls["n"] += 1

        def killable(model, batch, epoch):
            if calls["n"] == 2 and epoch == 1:
                raise KeyboardInterrupt("killed")
            return step(model, batch, epoch)
        return killable

    monkeypatch.setattr(mltr, "make_step", step_killed_in_the_second_rung)
    with pytest.raises(KeyboardInterrupt):
        cli.main(common + ["--out-dir", str(tmp_path / "killed")])
    monkeypatch.setattr(mltr, "make_step", original_step)
    finished = (tmp_path / "killed" / "window" / "last.pt").stat().st_mtime_ns
    cli.main(common + ["--out-dir", str(tmp_path / "killed")])
    assert (tmp_path / "killed" / "window" / "last.pt").stat().st_mtime_ns == finished  # not retrained
    straight, resumed = (json.loads((tmp_path / d / "results.json").read_text())["histories"]
                         for d in ("straight", "killed"))
    assert without_seconds(resumed) == without_seconds(straight)


def _ddp_worker(rank, world, port, out_dir):
    torchrun_environment(rank, world, port)
    cfg = mltr.config_with(**SMALL, out_dir=out_dir, device="cpu", train_samples=64, test_samples=21, epochs=1,
                           batch_size=16, rungs=("count-token",))
    histories = mltr.run(cfg)
    model = mltr.build_model("count-token", cfg, 10, 1)
    engine.load_weights(model, os.path.join(out_dir, "count-token"))
    torch.save({"params": [p.detach() for p in model.parameters()], "histories": histories},
               os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ddp_on_two_cpu_processes(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    rank0, rank1 = ranks_that_agree(tmp_path)
    # the gathered evaluation scores all 21 test canvases once: it equals one process scoring them
    cfg = mltr.config_with(**SMALL, test_samples=21)
    model = mltr.build_model("count-token", cfg, 10, 1)
    assert engine.load_weights(model, str(tmp_path / "count-token"))
    single = mltr.evaluate(model.eval(), DigitCanvases("test", 21, cfg.canvas), cfg,
                           distributed.Context(0, 1, torch.device("cpu")))
    final = rank0["histories"]["count-token"][-1]
    for key in ("mAP", "OF1", "CF1", "count_accuracy"):
        assert final[key] == pytest.approx(single[key], rel=1e-6)


def test_mitr_as_l2d_teacher_and_as_student(tmp_path, capsys):
    common = ["l2d", "--preset", "smoke", "--methods", "vanilla,l2d", "--train-samples", "32", "--test-samples",
              "16", "--batch-size", "16"]
    cli.main(common + ["--teacher-backbone", "mitr-tiny", "--out-dir", str(tmp_path / "teacher")])
    cli.main(common + ["--student-backbone", "mitr-tiny", "--out-dir", str(tmp_path / "student")])
    assert capsys.readouterr().out.count("| l2d |") == 2
    teacher = torch.load(tmp_path / "teacher" / "teacher" / "last.pt", weights_only=True)["model"]
    student = torch.load(tmp_path / "student" / "l2d" / "last.pt", weights_only=True)["model"]
    assert "backbone.patch_embed.weight" in teacher and "backbone.patch_embed.weight" in student
    net, channels = build_backbone("mitr-tiny", 1, image_size=24)
    assert channels == 128 and net(torch.randn(2, 1, 24, 24)).shape == (2, 128, 2, 2)
    with pytest.raises(ValueError, match="mitr-tiny"):
        l2d.check_backbone_name("mitr-xl")
    with pytest.raises(ValueError, match="segmentation backbone must be a CNN"):
        split_backbone("mitr-tiny", 3)
