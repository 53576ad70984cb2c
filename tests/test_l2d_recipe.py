"""The L2D recipe: every method takes a training step, fastkd and reference losses agree, the CLI runs on the
built-in and on a real (image-list) dataset, a given teacher checkpoint, autocast, DDP with 2 CPU processes."""
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

pytest.importorskip("sklearn")
from fastkd.data import CanvasConfig, DigitCanvases  # noqa: E402
from fastkd.recipes import cli, distributed, engine, l2d  # noqa: E402
from tests.conftest import (RunsACommand, free_port, ranks_that_agree,  # noqa: E402
                           torchrun_environment, without_seconds)

TINY = dict(canvas=CanvasConfig(size=24, digit_sizes=(8, 12), max_digits=3), teacher_backbone="cnn-4-8",
            student_backbone="cnn-4", embed_dim=16, heads=2, ffn_dim=32, led_warmup_epochs=0)


@pytest.mark.parametrize("method", list(l2d.METHODS))
def test_each_method_trains_and_fastkd_matches_reference(method):
    # float64: at initialisation a class's student embeddings nearly coincide, where fp32 distances are noise
    cfg = l2d.config_with(**TINY)
    data = DigitCanvases("train", 16, cfg.canvas)
    batch = [data.images.double(), data.targets.double()]
    teacher = l2d.build_model(cfg.teacher_backbone, cfg).double().eval().requires_grad_(False)
    losses = {}
    for impl in ("fastkd", "reference"):
        torch.manual_seed(0)
        student = l2d.build_model(cfg.student_backbone, cfg).double().eval()  # no dropout: same forward twice
        terms = l2d.make_step(method, l2d.config_with(**TINY, loss_impl=impl), teacher, torch.device("cpu"))(
            student, batch, epoch=0)
        loss = sum(terms.values())
        loss.backward()
        losses[impl] = (loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None])
    torch.testing.assert_close(losses["fastkd"][0], losses["reference"][0], rtol=1e-9, atol=1e-9)
    # LED gradients at init: the reference's uncentred distances carry ~1e-7 relative noise even in fp64
    for a, b in zip(losses["fastkd"][1], losses["reference"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_cli_runs_the_ablation_and_writes_the_report(tmp_path, capsys):
    cli.main(["l2d", "--preset", "smoke", "--out-dir", str(tmp_path), "--train-samples", "128", "--test-samples",
              "64", "--teacher-epochs", "1", "--student-epochs", "1", "--batch-size", "32", "--methods", "vanilla,l2d"])
    out = capsys.readouterr().out
    assert "| teacher |" in out and "| l2d |" in out
    report = json.loads((tmp_path / "results.json").read_text())
    assert set(report["histories"]) == {"teacher", "vanilla", "l2d"}
    per_class = report["histories"]["l2d"][-1]["AP_per_class"]
    known = [ap for ap in per_class if ap is not None]
    assert len(per_class) == 10 and sum(known) / len(known) == pytest.approx(report["histories"]["l2d"][-1]["mAP"])
    assert (tmp_path / "results.png").exists() and (tmp_path / "results.md").exists()
    assert (tmp_path / "l2d" / "last.pt").exists()


def test_cli_rejects_unknown_methods(capsys):
    with pytest.raises(SystemExit):
        cli.main(["l2d", "--methods", "vanilla,kd"])
    assert "unknown ['kd']" in capsys.readouterr().err


def _ddp_worker(rank, world, port, out_dir):
    torchrun_environment(rank, world, port)
    cfg = l2d.config_with(**TINY, out_dir=out_dir, device="cpu", train_samples=96, test_samples=37, teacher_epochs=1,
                          student_epochs=1, batch_size=16, methods=("l2d",))
    histories = l2d.run(cfg)
    ctx = distributed.init("cpu")
    student = l2d.build_model(cfg.student_backbone, cfg)
    engine.load_weights(student, os.path.join(out_dir, "l2d"))
    scores = l2d.evaluate(student.eval(), DigitCanvases("test", cfg.test_samples, cfg.canvas, cfg.seed), cfg, ctx)
    torch.save({"params": [p.detach() for p in student.parameters()], "histories": histories, "scores": scores},
               os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ddp_recipe_on_two_cpu_processes(tmp_path):
    port = free_port()
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    rank0, rank1 = ranks_that_agree(tmp_path)  # losses averaged over ranks
    # the gathered evaluation scores all 37 test canvases once: it equals a single process scoring them
    cfg = l2d.config_with(**TINY, test_samples=37)
    student = l2d.build_model(cfg.student_backbone, cfg)
    assert engine.load_weights(student, str(tmp_path / "l2d"))
    single = l2d.evaluate(student.eval(), DigitCanvases("test", 37, cfg.canvas), cfg,
                          distributed.Context(0, 1, torch.device("cpu")))
    assert rank0["scores"].pop("AP_per_class") == pytest.approx(single.pop("AP_per_class"), rel=1e-6)
    assert rank0["scores"] == pytest.approx(single, rel=1e-6)
    assert json.loads((tmp_path / "results.json").read_text())["histories"]["l2d"][0]["epoch"] == 1


def _write_image_list(root, split, n, classes=3):
    gen = torch.Generator().manual_seed(len(split))
    labels = (torch.rand(n, classes, generator=gen) < 0.5).int()
    labels[:, 0] = 1 - labels[:, 1]  # every row has a positive (class 0 or 1)
    rows = []
    for i, row in enumerate(labels.tolist()):
        path = root / "images" / f"{split}{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (12, 10), tuple(int(80 * c) for c in row)).save(path)
        rows.append(f"images/{path.name} " + " ".join(map(str, row)))
    (root / f"{split}.txt").write_text("\n".join(rows) + "\n")


def test_real_dataset_and_a_given_teacher_checkpoint(tmp_path, capsys):
    _write_image_list(tmp_path, "train", 12)
    _write_image_list(tmp_path, "test", 6)
    common = ["l2d", "--dataset", "image-list", "--data-root", str(tmp_path), "--image-size", "16",
              "--num-workers", "0", "--teacher-backbone", "cnn-4-8", "--student-backbone", "cnn-4",
              "--teacher-epochs", "1", "--student-epochs", "1", "--batch-size", "4", "--methods", "vanilla,l2d"]
    cli.main(common + ["--out-dir", str(tmp_path / "first")])
    first = json.loads((tmp_path / "first" / "results.json").read_text())["histories"]
    assert set(first) == {"teacher", "vanilla", "l2d"}
    state = torch.load(tmp_path / "first" / "teacher" / "last.pt", weights_only=True)["model"]
    assert state["head.queries"].shape[0] == 3 and state["backbone.0.weight"].shape[1] == 3  # classes, RGB
    cli.main(common + ["--out-dir", str(tmp_path / "second"), "--teacher-checkpoint",
                       str(tmp_path / "first" / "teacher" / "last.pt")])
    second = json.loads((tmp_path / "second" / "results.json").read_text())["histories"]
    assert not (tmp_path / "second" / "teacher").exists()
    assert second["teacher"][0]["mAP"] == pytest.approx(first["teacher"][-1]["mAP"])
    assert without_seconds(second)["vanilla"] == without_seconds(first)["vanilla"]
    assert "image-list test set" in capsys.readouterr().out


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_step_and_grad_scaler(amp, tmp_path):
    cfg = l2d.config_with(**TINY, amp=amp, out_dir=str(tmp_path), device="cpu", train_samples=32, test_samples=16,
                          teacher_epochs=1, student_epochs=1, batch_size=16, methods=("l2d",))
    histories = l2d.run(cfg)
    checkpoint = torch.load(tmp_path / "l2d" / "last.pt", weights_only=True)
    assert all(torch.isfinite(torch.tensor(h[-1]["train_loss"])) for h in histories.values())
    assert (checkpoint["scaler"] is not None) == (amp == "fp16")  # fp16 scales the loss, bf16 needs no scaler


def test_summary_over_runs(tmp_path, capsys):
    for run, (teacher, vanilla, student) in enumerate([(90.0, 60.0, 72.0), (80.0, 70.0, 71.0)]):
        (tmp_path / str(run)).mkdir()
        histories = {"teacher": [{"mAP": teacher}], "vanilla": [{"mAP": 0.0}, {"mAP": vanilla}],
                     "l2d": [{"mAP": student}]}
        (tmp_path / str(run) / "results.json").write_text(json.dumps({"histories": histories}))
    cli.main(["l2d-summary", str(tmp_path / "0"), str(tmp_path / "1")])
    out = capsys.readouterr().out
    assert "| vanilla | 65.0 ± 7.1 | 60.0 / 70.0 | - |" in out
    assert "| l2d | 71.5 ± 0.7 | 72.0 / 71.0 | 25% |" in out  # mean of 40% and 10%


def test_a_killed_ablation_resumes_where_it_stopped(tmp_path, monkeypatch):
    common = ["l2d", "--preset", "smoke", "--train-samples", "64", "--test-samples", "32", "--teacher-epochs", "1",
              "--student-epochs", "2", "--batch-size", "16", "--methods", "vanilla,l2d"]
    original_step = l2d.make_step
    cli.main(common + ["--out-dir", str(tmp_path / "straight")])

    def step_killed_in_l2d_epoch_2(method, *args, **kwargs):
        step = original_step(method, *args, **kwargs)

        def killable(model, batch, epoch):
            if method == "l2d" and epoch == 1:
                raise KeyboardInterrupt("killed")
            return step(model, batch, epoch)
        return killable

    monkeypatch.setattr(l2d, "make_step", step_killed_in_l2d_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        cli.main(common + ["--out-dir", str(tmp_path / "killed")])
    monkeypatch.setattr(l2d, "make_step", original_step)
    trained_before = {name: (tmp_path / "killed" / name / "last.pt").stat().st_mtime_ns
                      for name in ("teacher", "vanilla")}
    cli.main(common + ["--out-dir", str(tmp_path / "killed"), "--resume"])
    assert trained_before == {name: (tmp_path / "killed" / name / "last.pt").stat().st_mtime_ns
                              for name in ("teacher", "vanilla")}  # finished models were not retrained
    straight, resumed = (json.loads((tmp_path / d / "results.json").read_text())["histories"]
                         for d in ("straight", "killed"))
    assert without_seconds(resumed) == without_seconds(straight)


def test_a_crafted_teacher_checkpoint_is_refused_without_running_its_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "payload": RunsACommand(marker)}, tmp_path / "teacher.pt")
    with pytest.raises(SystemExit):
        cli.main(["l2d", "--preset", "smoke", "--out-dir", str(tmp_path / "run"), "--teacher-checkpoint",
                  str(tmp_path / "teacher.pt"), "--methods", "vanilla"])
    err = capsys.readouterr().err
    assert "teacher.pt holds Python objects" in err and "--teacher-checkpoint" in err and not marker.exists()


def test_a_corrupt_checkpoint_in_the_out_dir_names_the_file_and_the_way_out(tmp_path, capsys):
    common = ["l2d", "--preset", "smoke", "--out-dir", str(tmp_path), "--methods", "vanilla"]
    cli.main(common)
    checkpoint = tmp_path / "vanilla" / "last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(common)
    err = capsys.readouterr().err
    assert str(checkpoint) in err and "--no-resume" in err and len(err.splitlines()) == 1
    cli.main(common + ["--no-resume"])  # the way out works


def test_summary_when_the_gap_is_undefined(tmp_path, capsys):
    runs = {"tie": (70.0, 70.0, 72.0), "teacher below vanilla": (60.0, 70.0, 65.0), "normal": (80.0, 70.0, 75.0)}
    for run, (teacher, vanilla, student) in runs.items():
        (tmp_path / run).mkdir()
        histories = {"teacher": [{"mAP": teacher}], "vanilla": [{"mAP": vanilla}], "l2d": [{"mAP": student}]}
        (tmp_path / run / "results.json").write_text(json.dumps({"histories": histories}))
    cli.main(["l2d-summary", str(tmp_path / "tie"), str(tmp_path / "teacher below vanilla")])
    assert "| l2d | 68.5 ± 4.9 | 72.0 / 65.0 | - |" in capsys.readouterr().out  # no division by zero, no 130%
    cli.main(["l2d-summary", *(str(tmp_path / run) for run in runs)])
    assert "| 50% (1 of 3 runs; the others' teacher is not ahead) |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["l2d-summary", str(tmp_path / "absent")])
    assert "absent/results.json: no such file" in capsys.readouterr().err
