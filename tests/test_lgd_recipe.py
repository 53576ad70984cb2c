"""The LGD recipe: the built-in detection canvases, the step-by-step driving of each torchvision detector (equal
to its own forward), one training step per detector, the staging (adapter-only, frozen body), COCOeval on a
fixture with a known answer, the COCO-format loader and the recipe on it, the CLI report, resume, bad options,
DDP with 2 CPU processes."""
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

pytest.importorskip("sklearn")
pytest.importorskip("pycocotools")
from fastkd.data.coco_detection import COCODetection  # noqa: E402
from fastkd.data.digit_canvases import source_splits  # noqa: E402
from fastkd.data.digit_detection import DetectionCanvasConfig, DigitDetection, generate_detection_canvases  # noqa: E402
from fastkd.metrics.detection import coco_evaluate, detections_to_coco  # noqa: E402
from fastkd.models.detection import ARCHITECTURES, build_detector, detect, pyramid  # noqa: E402
from fastkd.recipes import cli, distributed, engine, lgd  # noqa: E402
from tests.conftest import (free_port, killed_make_step, ranks_that_agree,  # noqa: E402
                           torchrun_environment, without_seconds)

CANVAS = DetectionCanvasConfig(size=64, digit_sizes=(14, 28), max_digits=3)
TINY = dict(canvas=CANVAS, backbone="cnn-4-8-8-16", fpn_channels=32, encoder_widths=(8, 8, 16), min_sizes=(64,),
            max_size=64, batch_size=4, train_samples=16, test_samples=12, warmup_iters=1, lr_steps=(3,),
            adapter_only_iters=2, freeze_body_iters=1)
SMOKE = ["lgd", "--preset", "smoke", "--train-samples", "16", "--test-samples", "12"]
CPU = distributed.Context(0, 1, torch.device("cpu"))


def _model(method: str, arch: str = "fcos", n: int = 2):
    """(model in training mode, config, images, targets) of a tiny `method` model and a batch of n canvases."""
    cfg = lgd.config_with(**TINY, arch=arch)
    data = DigitDetection("train", n, cfg.canvas)
    images, targets = lgd.collate([data[i] for i in range(n)])
    torch.manual_seed(0)
    return lgd.build_model(method, cfg, data).train(), cfg, list(images), list(targets)


# ------------------------------------------------------------------------------------------------ built-in data
def test_detection_canvases_are_deterministic_boxed_and_split_by_source_image():
    images, targets, sources = generate_detection_canvases("train", 30, CANVAS, 0)
    again = generate_detection_canvases("train", 30, CANVAS, 0)
    assert torch.equal(images, again[0]) and all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets, again[1]))
    for image, target, used in zip(images, targets, sources):
        boxes, labels = target["boxes"], target["labels"]
        assert len(boxes) == len(labels) == len(used) >= 1 and labels.unique().numel() == len(labels)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= CANVAS.size).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        assert ((labels >= 1) & (labels <= 10)).all()
    test_sources = {s for row in generate_detection_canvases("test", 30, CANVAS, 0)[2] for s in row}
    train_sources = {s for row in sources for s in row}
    assert train_sources <= set(source_splits(0)["train"].tolist()) and not train_sources & test_sources
    # a lone digit's box bounds its ink: the pixels just outside it are background (no other digit there)
    from fastkd.data.digit_canvases import _digits
    labels_of_sources = _digits()[1]
    assert all(int(labels_of_sources[s]) + 1 == int(label) for row, t in zip(sources, targets)
               for s, label in zip(row, t["labels"]))


def test_ground_truth_json_scores_itself_perfectly():
    data = DigitDetection("test", 12, CANVAS)
    gt = data.coco_ground_truth()
    rows = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"]]
    metrics = coco_evaluate(gt, rows)
    assert metrics["AP"] == pytest.approx(100) and metrics["AP50"] == pytest.approx(100)


# ------------------------------------------------------------------------------------------------ COCOeval
def _fixture_ground_truth():
    return {"images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 40, 40], "area": 1600,
                             "iscrowd": 0},
                            {"id": 2, "image_id": 2, "category_id": 7, "bbox": [50, 50, 40, 40], "area": 1600,
                             "iscrowd": 0}],
            "categories": [{"id": 7, "name": "seven"}]}


def test_coco_evaluation_on_a_fixture_with_a_known_answer():
    gt = _fixture_ground_truth()
    hit = {"image_id": 1, "category_id": 7, "bbox": [10, 10, 40, 40], "score": 0.9}
    # one of two objects found, nothing wrong ranked above it: precision 1 up to recall 0.5, so 51 of COCO's 101
    # recall points have precision 1 at every IoU threshold
    assert coco_evaluate(gt, [hit])["AP"] == pytest.approx(100 * 51 / 101)
    # a false positive ranked first halves the precision at recall 0.5
    false = {"image_id": 2, "category_id": 7, "bbox": [0, 0, 20, 20], "score": 0.95}
    metrics = coco_evaluate(gt, [hit, false])
    assert metrics["AP"] == pytest.approx(100 * 51 / 101 / 2) and metrics["APs"] == -1  # no small objects
    assert coco_evaluate(gt, [])["AP"] == 0
    # detector outputs (x1 y1 x2 y2, labels 1..K) become COCO rows of the dataset's category ids
    rows = detections_to_coco([{"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "scores": torch.tensor([0.5]),
                                "labels": torch.tensor([1])}], [1], [7])
    assert rows == [{**hit, "score": 0.5}]


# ------------------------------------------------------------------------------------------------ detectors
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_step_by_step_driving_equals_the_detectors_own_forward(arch):
    model, _, images, targets = _model("baseline", arch)
    torch.manual_seed(1)
    driven = model(images, targets)
    torch.manual_seed(1)
    own = model.detector(images, targets)
    assert driven.keys() == own.keys()
    for name in own:
        torch.testing.assert_close(driven[name], own[name])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_detections_from_given_features_equal_the_detectors_own(arch):
    model, _, images, _ = _model("baseline", arch)
    detector = model.detector.eval()
    (detector.roi_heads if arch == "fasterrcnn" else detector).score_thresh = 0.0  # untrained: keep every box
    with torch.no_grad():
        batch, _ = detector.transform(images)
        given = detect(detector, batch, pyramid(detector, batch.tensors), [tuple(i.shape[-2:]) for i in images])
        own = detector(images)
    assert all(len(out["boxes"]) > 0 for out in own)
    for a, b in zip(given, own):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_lgd_training_step_per_detector(arch):
    model, cfg, images, targets = _model("lgd", arch)
    optimizer = lgd.make_optimizer(cfg, model)
    assert [g["name"] for g in optimizer.param_groups] == ["student", "label_guided"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scheduler.last_epoch = cfg.adapter_only_iters  # past both stages
    terms = lgd.make_step("lgd", cfg, scheduler, torch.device("cpu"))(model, (images, targets), 0)
    assert "distill" in terms and any(name.endswith("_teacher") for name in terms)
    assert all(torch.isfinite(v) for v in terms.values())
    before = [p.detach().clone() for p in model.parameters()]
    sum(terms.values()).backward()
    without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    context_unused = not lgd.CONTEXT_BOX[arch]
    assert without_grad == (["teacher.mapper.context.weight", "teacher.mapper.context.bias"] if context_unused else [])
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_bf16_autocast_step_gives_float32_terms_and_gradients():
    model, cfg, images, targets = _model("lgd")
    cfg.amp = "bf16"  # CPU autocast here; the same code path as --amp bf16 on a GPU
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(model.parameters(), lr=0.1), lambda s: 1.0)
    terms = lgd.make_step("lgd", cfg, scheduler, torch.device("cpu"))(model, (images, targets), 0)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_stages_adapter_only_and_frozen_body():
    model, cfg, images, targets = _model("lgd")
    losses = model(images, targets, distill_student=False, freeze_body=True)
    losses["distill"].backward(retain_graph=True)
    assert all(p.grad is None for p in model.detector.parameters())  # only the adapter learns from the distillation
    assert all(p.grad is not None for p in model.adapter.parameters())
    model.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.detector.backbone.body.parameters())
    assert all(p.grad is not None for p in model.detector.backbone.fpn.parameters())
    # the recipe's step picks the stage from the optimizer steps taken (the scheduler's count)
    calls = []
    original = model.forward
    model.forward = lambda *a, **k: calls.append(k) or original(*a, **k)
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(model.parameters(), lr=0.1), lambda s: 1.0)
    step = lgd.make_step("lgd", cfg, scheduler, torch.device("cpu"))
    for iteration in (0, 1, 2):
        scheduler.last_epoch = iteration
        step(model, (images, targets), 0)
    assert calls == [dict(distill_student=False, freeze_body=True), dict(distill_student=False, freeze_body=False),
                     dict(distill_student=True, freeze_body=False)]


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_trains_baseline_and_lgd_and_writes_the_report(tmp_path, capsys):
    assert cli.main(SMOKE + ["--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| model | AP | AP50 | AP75 | APs | APm | APl | AP vs baseline |" in out and "| lgd |" in out
    histories = json.loads((tmp_path / "results.json").read_text())["histories"]
    assert set(histories) == {"baseline", "lgd"}
    assert {"train_distill", "train_classification_teacher", "AP", "AP50", "teacher_AP"} <= set(histories["lgd"][-1])
    assert "teacher_AP" not in histories["baseline"][-1] and "| lgd: head on the instructive features" in out
    assert (tmp_path / "results.md").exists()


@pytest.mark.parametrize("flags,message", [
    (["--backbone", "resnet18"], "--backbone"),
    (["--dataset", "coco"], "--dataset coco needs --data-root"),
    (["--fpn-channels", "80"], "GroupNorm(32)"),
    (["--encoder-widths", "8,8"], "three widths"),
])
def test_bad_options_are_refused_with_their_name(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(SMOKE + ["--out-dir", str(tmp_path)] + flags)
    assert message in capsys.readouterr().err


def test_a_killed_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    common = SMOKE + ["--iterations", "8", "--lr-steps", "6"]  # 4 steps per epoch: 2 epochs
    cli.main(common + ["--out-dir", str(tmp_path / "straight")])
    monkeypatch.setattr(lgd, "make_step", killed_make_step(lgd.make_step, "lgd", epoch=1))
    with pytest.raises(KeyboardInterrupt):
        cli.main(common + ["--out-dir", str(tmp_path / "killed")])
    monkeypatch.undo()
    baseline_mtime = (tmp_path / "killed" / "baseline" / "last.pt").stat().st_mtime_ns
    cli.main(common + ["--out-dir", str(tmp_path / "killed")])
    assert (tmp_path / "killed" / "baseline" / "last.pt").stat().st_mtime_ns == baseline_mtime
    straight, resumed = (json.loads((tmp_path / d / "results.json").read_text())["histories"]
                         for d in ("straight", "killed"))
    assert without_seconds(resumed) == without_seconds(straight)


# ------------------------------------------------------------------------------------------------ COCO format
def _write_coco(root, split, n):
    gen = torch.Generator().manual_seed(n)
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        pixels = (torch.rand(48, 56, 3, generator=gen) * 60).to(torch.uint8)
        x, y = 4 + 3 * i, 6 + 2 * i
        pixels[y:y + 20, x:x + 16] = 220
        Image.fromarray(pixels.numpy()).save(root / split / f"{i}.png")
        images.append({"id": 100 + i, "file_name": f"{i}.png", "width": 56, "height": 48})
        annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, "category_id": 3 if i % 2 else 9,
                            "bbox": [x, y, 16, 20], "area": 320, "iscrowd": 0})
        annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, "category_id": 9,
                            "bbox": [0, 0, 56, 48], "area": 2688, "iscrowd": 1})  # crowd: not a training target
    categories = [{"id": 3, "name": "three"}, {"id": 9, "name": "nine"}]
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def test_coco_format_loader_and_the_recipe_on_a_fixture(tmp_path, capsys):
    _write_coco(tmp_path / "coco", "train2017", 8)
    _write_coco(tmp_path / "coco", "val2017", 4)
    data = COCODetection(str(tmp_path / "coco" / "annotations" / "instances_train2017.json"),
                         str(tmp_path / "coco" / "train2017"))
    image, target = data[1]
    assert image.shape == (3, 48, 56) and 0 <= image.min() and image.max() <= 1
    assert target["boxes"].tolist() == [[7.0, 8.0, 23.0, 28.0]] and target["labels"].tolist() == [1]  # 3 -> 1, 9 -> 2
    flipped = COCODetection(data.annotation_path, data.image_dir, augment=True)
    torch.manual_seed(0)
    seen = {tuple(flipped[1][1]["boxes"][0].tolist()) for _ in range(8)}
    assert seen == {(7.0, 8.0, 23.0, 28.0), (56 - 23.0, 8.0, 56 - 7.0, 28.0)}
    with pytest.raises(FileNotFoundError, match="image folder"):
        COCODetection(data.annotation_path, str(tmp_path / "nowhere"))
    assert cli.main(SMOKE + ["--dataset", "coco", "--data-root", str(tmp_path / "coco"), "--out-dir",
                             str(tmp_path / "run"), "--num-workers", "0", "--min-sizes", "48", "--max-size", "64",
                             "--methods", "lgd"]) == 0
    assert "| lgd |" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank, world, port, out_dir):
    torchrun_environment(rank, world, port)
    cfg = lgd.config_with(**TINY, out_dir=out_dir, device="cpu", iterations=3, methods=("lgd",))
    histories = lgd.run(cfg)
    ctx = distributed.init("cpu")
    data = lgd.load_data(cfg)
    model = lgd.build_model("lgd", cfg, data["train"])
    engine.load_weights(model, os.path.join(out_dir, "lgd"))
    scores = lgd.evaluate(model.eval(), data["test"], cfg, ctx, batch_size=5)
    torch.save({"params": [p.detach() for p in model.parameters()], "histories": histories, "scores": scores},
               os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ddp_recipe_on_two_cpu_processes(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    rank0, rank1 = ranks_that_agree(tmp_path)
    # the sharded, gathered evaluation scores every test image once: it equals one process scoring them all
    cfg = lgd.config_with(**TINY)
    data = lgd.load_data(cfg)
    model = lgd.build_model("lgd", cfg, data["train"])
    assert engine.load_weights(model, str(tmp_path / "lgd"))
    single = lgd.evaluate(model.eval(), data["test"], cfg, CPU)
    assert rank0["scores"] == rank1["scores"] == pytest.approx(single)


def test_resnet50_backbone_reads_a_local_state_dict_only(tmp_path):
    import torchvision
    net = torchvision.models.resnet50(weights=None)
    torch.save(net.state_dict(), tmp_path / "resnet50.pth")
    detector = build_detector("retinanet", 3, backbone="resnet50", backbone_weights=str(tmp_path / "resnet50.pth"),
                              min_size=64, max_size=64)
    torch.testing.assert_close(detector.backbone.body.layer4[0].conv1.weight, net.layer4[0].conv1.weight)
    assert not detector.backbone.body.conv1.weight.requires_grad  # stem and layer1 frozen, as torchvision does
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises((ValueError, RuntimeError)):
        build_detector("fcos", 3, backbone="resnet50", backbone_weights=str(tmp_path / "other.pth"))
