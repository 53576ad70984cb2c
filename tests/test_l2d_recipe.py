"""The L2D recipe: every method takes a training step, fastkd and reference losses agree, the CLI runs."""
import json

import pytest
import torch

pytest.importorskip("sklearn")
from fastkd.data import CanvasConfig, DigitCanvases  # noqa: E402
from fastkd.recipes import cli, l2d  # noqa: E402

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
        loss = l2d.make_step(method, l2d.config_with(**TINY, loss_impl=impl), teacher, torch.device("cpu"))(
            student, batch, epoch=0)
        loss.backward()
        losses[impl] = (loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None])
    torch.testing.assert_close(losses["fastkd"][0], losses["reference"][0], rtol=1e-9, atol=1e-9)
    # LED gradients at init: the reference's uncentred distances carry ~1e-7 relative noise even in fp64
    for a, b in zip(losses["fastkd"][1], losses["reference"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_cli_runs_the_ablation_and_writes_the_report(tmp_path, capsys, monkeypatch):
    original = l2d.config_with
    monkeypatch.setattr(l2d, "config_with", lambda **kw: original(**{**TINY, **kw}))
    cli.main(["l2d", "--out-dir", str(tmp_path), "--train-samples", "128", "--test-samples", "64",
              "--teacher-epochs", "1", "--student-epochs", "1", "--batch-size", "32", "--methods", "vanilla,l2d"])
    out = capsys.readouterr().out
    assert "| teacher |" in out and "| l2d |" in out
    report = json.loads((tmp_path / "results.json").read_text())
    assert set(report["histories"]) == {"teacher", "vanilla", "l2d"}
    assert (tmp_path / "results.png").exists() and (tmp_path / "results.md").exists()
    assert (tmp_path / "l2d" / "last.pt").exists()


def test_cli_rejects_unknown_methods(capsys):
    with pytest.raises(SystemExit):
        cli.main(["l2d", "--methods", "vanilla,kd"])
    assert "unknown ['kd']" in capsys.readouterr().err
