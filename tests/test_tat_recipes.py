"""The TaT recipes (classification `tat`, segmentation `tat-seg`): built-in data deterministic and without split
leakage, the real-dataset loaders on fixtures (and on Fashion-MNIST when installed), the TaT heads against the
plain formula, one step of every method, the CLI report, resume, DDP with 2 CPU processes."""
import gzip
import json
import os
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("sklearn")
from fastkd.data.classification import FASHION_MNIST_DIR, open_classification, read_idx  # noqa: E402
from fastkd.data.digit_numbers import (PAIRS, DigitSegmentation, NumberCanvasConfig,  # noqa: E402
                                       SegmentationCanvasConfig, TwoDigitNumbers, generate_numbers,
                                       generate_segmentation)
from fastkd.data.digit_canvases import source_splits  # noqa: E402
from fastkd.data.sbd import SBDSegmentation, VOCTrainAug  # noqa: E402
from fastkd.data.voc_segmentation import VOCSegmentation2012  # noqa: E402
from fastkd.metrics import confusion_matrix, segmentation_scores  # noqa: E402
from fastkd.models import Classifier, DeepLabV3Plus, from_torchvision_resnet  # noqa: E402
from fastkd.nn import HierarchicalTaTLoss, TaTLoss  # noqa: E402
from fastkd.recipes import cli, distributed, engine, tat, tat_seg  # noqa: E402
from fastkd.recipes.teacher_features import WithTeacherFeatures  # noqa: E402
from tests.conftest import free_port, torchrun_environment, without_seconds  # noqa: E402

NUMBERS = NumberCanvasConfig(size=16, digit_sizes=(6, 8), distractors=1, distractor_sizes=(3, 4), jitter=1)
SEGMENT = SegmentationCanvasConfig(size=16, digit_sizes=(6, 10), max_digits=2)
SEGMENT_DISTRACTORS = SegmentationCanvasConfig(size=16, digit_sizes=(6, 10), max_digits=2, distractors=2,
                                               distractor_sizes=(3, 5))
TINY = dict(canvas=NUMBERS, teacher_backbone="cnn-4-8", student_backbone="cnn-4-4", batch_size=16)
TINY_SEG = dict(canvas=SEGMENT, teacher_backbone="cnn-4-4-4-8", student_backbone="cnn-4-4-4-4",
                teacher_decoder_channels=8, student_decoder_channels=4, grid=(2, 2), groups=2, anchor_grid=(2, 2),
                batch_size=8)
CPU = distributed.Context(0, 1, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ built-in data
@pytest.mark.parametrize("generate,config", [(generate_numbers, NUMBERS), (generate_segmentation, SEGMENT),
                                             (generate_segmentation, SEGMENT_DISTRACTORS)])
def test_built_in_data_is_deterministic_and_splits_share_no_source_digit(generate, config):
    first, again, other = generate("train", 40, config, 0), generate("train", 40, config, 0), generate(
        "train", 40, config, 1)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    used = {split: set(generate(split, 60, config, 0)[2].flatten().tolist()) - {-1} for split in ("train", "test")}
    allowed = {split: set(source_splits(0)[split].tolist()) for split in ("train", "test")}
    assert used["train"] <= allowed["train"] and used["test"] <= allowed["test"]
    assert not used["train"] & used["test"]


def test_numbers_labels_are_the_digit_pairs_shown():
    from fastkd.data.digit_canvases import _digits
    data = TwoDigitNumbers("train", 110, NUMBERS)
    assert data.num_classes == len(PAIRS) == 55 and torch.bincount(data.targets, minlength=55).tolist() == [2] * 55
    digit_labels = _digits()[1]
    for label, sources in zip(data.targets.tolist(), data.sources.tolist()):
        assert tuple(sorted(digit_labels[sources].tolist())) == PAIRS[label]


def test_segmentation_masks_mark_digit_pixels():
    data = DigitSegmentation("test", 30, SEGMENT)
    assert data.masks.min() >= 0 and data.masks.max() <= 10 and data.masks.dtype == torch.long
    ink = data.masks > 0
    assert 0.02 < ink.float().mean() < 0.6  # digits cover some, not most, of each canvas
    assert data.images[:, 0][ink].mean() > data.images[:, 0][~ink].mean() + 0.3  # the mask is where the ink is


def test_segmentation_distractors_are_drawn_and_labelled_background():
    only = SegmentationCanvasConfig(size=16, min_digits=0, max_digits=0, distractors=2, distractor_sizes=(4, 6),
                                    strokes=0, noise=0.0)
    images, masks, sources = generate_segmentation("train", 20, only)
    assert (images > 0.3).flatten(1).any(1).all()  # every canvas shows its distractors' ink
    assert masks.eq(0).all() and sources.numel() == 0  # ... and none of it is labelled
    plain = generate_segmentation("train", 20, replace(only, distractors=0))[0]
    assert plain.eq(0).all()


# ------------------------------------------------------------------------------------------------ loaders
def _write_idx(path, array, compress):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_idx_fixture(tmp_path, compress):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 7), ("t10k", 3)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                   compress)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8), compress)
    train = open_classification("fashion-mnist", str(tmp_path), "train")
    image, label = train[6]
    raw = read_idx(str(tmp_path / ("train-images-idx3-ubyte" + (".gz" if compress else ""))))
    assert len(train) == 7 and image.shape == (1, 28, 28) and label.dtype == torch.long
    torch.testing.assert_close(image[0], (torch.from_numpy(raw[6].copy()).float() / 255 - 0.2860) / 0.3530)
    assert len(open_classification("fashion-mnist", str(tmp_path), "test")) == 3


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="apt-get install dataset-fashion-mnist")
def test_installed_fashion_mnist():
    train = open_classification("fashion-mnist", FASHION_MNIST_DIR, "train")
    test = open_classification("fashion-mnist", FASHION_MNIST_DIR, "test")
    assert (len(train), len(test)) == (60000, 10000) and train.num_classes == 10
    assert torch.bincount(test.targets).tolist() == [1000] * 10


def test_cifar100_pickle_fixture(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 5), ("test", 4)):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": list(range(n)),
                 "coarse_labels": [0] * n}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    train = open_classification("cifar100", str(tmp_path), "train", augment=True)
    test = open_classification("cifar100", str(tmp_path), "test")
    image, label = test[3]
    assert (len(train), len(test), train.num_classes) == (5, 4, 100)
    assert image.shape == (3, 32, 32) and label.item() == 3 and train[0][0].shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        open_classification("cifar100", str(tmp_path / "cifar-100-python"), "train")


def test_imagenet_folder_fixture(tmp_path):
    for split in ("train", "val"):
        for c in ("n01", "n02", "n03"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (20, 14), (40 * i, 80, 0)).save(tmp_path / split / c / f"{i}.JPEG")
    train = open_classification("imagenet", str(tmp_path), "train", image_size=16, augment=True)
    val = open_classification("imagenet", str(tmp_path), "test", image_size=16)
    assert (len(train), len(val), val.num_classes) == (6, 6, 3)
    assert train[0][0].shape == val[5][0].shape == (3, 16, 16) and val[5][1].item() == 2


def _write_voc2012(root, ids=("a", "b", "c")):
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    palette = [v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)]
    for k, image_id in enumerate(ids):
        Image.new("RGB", (12 + 2 * k, 10), (30 * k, 60, 90)).save(base / "JPEGImages" / f"{image_id}.jpg")
        mask = np.zeros((10, 12 + 2 * k), dtype=np.uint8)
        mask[2:6, 3:8] = k + 1
        mask[0, :] = 255
        png = Image.fromarray(mask, mode="P")
        png.putpalette(palette)
        png.save(base / "SegmentationClass" / f"{image_id}.png")
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[:2]) + "\n")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text(ids[2] + "\n")


def test_voc2012_segmentation_fixture(tmp_path):
    _write_voc2012(tmp_path)
    val = VOCSegmentation2012(str(tmp_path), "val")
    image, mask = val[0]
    assert len(val) == 1 and image.shape == (3, 10, 16) and mask.shape == (10, 16) and mask.dtype == torch.long
    assert set(mask.unique().tolist()) == {0, 3, 255} and (mask == 3).sum() == 20  # palette indices, not colours
    train = VOCSegmentation2012(str(tmp_path), "train", crop_size=24, augment=True)
    torch.manual_seed(0)
    image, mask = train[1]
    assert image.shape == (3, 24, 24) and mask.shape == (24, 24)
    assert set(mask.unique().tolist()) <= {0, 2, 255} and (mask == 255).any()  # padding is ignored
    (tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages" / "b.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="b.jpg"):
        VOCSegmentation2012(str(tmp_path), "train")


def _write_sbd(root, train=("b", "d", "e"), val=("c", "e", "f")):
    """SBD's layout: img/{id}.jpg, cls/{id}.mat (struct GTcls, field Segmentation: uint8 class map), train.txt,
    val.txt; image k's mask holds class 10 + k."""
    from scipy.io import savemat
    (root / "img").mkdir(parents=True)
    (root / "cls").mkdir()
    for k, image_id in enumerate(sorted(set(train) | set(val))):
        Image.new("RGB", (9, 7 + k), (20 * k, 50, 0)).save(root / "img" / f"{image_id}.jpg")
        mask = np.zeros((7 + k, 9), dtype=np.uint8)
        mask[1:4, 2:6] = 10 + k
        savemat(root / "cls" / f"{image_id}.mat", {"GTcls": {"Segmentation": mask, "CategoriesPresent": [10 + k]}})
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "val.txt").write_text("\n".join(val) + "\n")


def test_sbd_fixture_and_the_voc_train_aug_set(tmp_path):
    _write_voc2012(tmp_path / "voc")  # VOC train a, b; val c
    _write_sbd(tmp_path / "sbd")      # SBD train b, d, e; val c, e, f
    sbd = SBDSegmentation(str(tmp_path / "sbd"))
    assert sbd.ids == ["b", "d", "e", "c", "f"]  # both lists, e once
    image, mask = sbd[1]  # d, the third id in sorted order (b, c, d, e, f): class 12
    assert image.shape == (3, 9, 9) and mask.shape == (9, 9) and mask.dtype == torch.long
    assert set(mask.unique().tolist()) == {0, 12} and (mask == 12).sum() == 12
    aug = VOCTrainAug(str(tmp_path / "voc"), str(tmp_path / "sbd"), crop_size=16, augment=False)
    assert aug.sbd.ids == ["d", "e", "f"]  # not VOC val's c, not VOC train's b (VOC's own mask)
    assert len(aug) == 5 and aug.num_classes == 21
    assert set(aug[0][1].unique().tolist()) == {0, 1, 255}  # VOC's a, palette indices
    assert set(aug[4][1].unique().tolist()) == {0, 14}      # SBD's f (sorted ids b..f: 10..14)
    cfg = tat_seg.config_with(dataset="voc2012", data_root=str(tmp_path / "voc"), sbd_root=str(tmp_path / "sbd"),
                              crop_size=16)
    cfg.check()
    data = tat_seg.load_data(cfg)  # the recipe trains on train_aug (augmented pairs), tests on VOC val
    torch.manual_seed(0)
    assert (len(data["train"]), len(data["test"])) == (5, 1) and data["train"][3][1].shape == (16, 16)
    (tmp_path / "sbd" / "cls" / "f.mat").unlink()
    with pytest.raises(FileNotFoundError, match="f.mat"):
        SBDSegmentation(str(tmp_path / "sbd"))
    with pytest.raises(FileNotFoundError, match="val.txt"):
        SBDSegmentation(str(tmp_path / "voc"))


def test_segmentation_metrics():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    confusion = confusion_matrix(predicted, target, 4)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    scores = segmentation_scores(confusion)
    assert scores["IoU_per_class"][:3] == pytest.approx([100 / 3, 75.0, 50.0])
    assert scores["IoU_per_class"][3] is None and scores["mIoU"] == pytest.approx((100 / 3 + 75 + 50) / 3)
    assert scores["pixel_acc"] == pytest.approx(500 / 7)


# ------------------------------------------------------------------------------------------------ models and heads
def test_models_give_the_distilled_features():
    logits, feature = Classifier("cnn-4-8-16", 55, 1)(torch.randn(2, 1, 24, 24))
    assert logits.shape == (2, 55) and feature.shape == (2, 16, 6, 6)
    net = DeepLabV3Plus("cnn-4-4-4-8", 11, 1, aspp_channels=8, decoder_channels=8, rates=(1, 2))
    logits, feature = net(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 11, 32, 32) and feature.shape == (2, 8, 8, 8)
    assert (feature < 0).any()  # before the ReLU, as the official distillation point
    import torchvision
    state = torchvision.models.resnet18(num_classes=7).state_dict()
    model = Classifier("resnet18", 7)
    model.load_state_dict(from_torchvision_resnet(state))
    torch.testing.assert_close(model.fc.weight, state["fc.weight"])


def test_tat_head_is_the_plain_official_formula():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 4, 5, 6, dtype=torch.float64), torch.randn(3, 8, 5, 6, dtype=torch.float64)
    head = TaTLoss(4, 8).double()  # Cs != Ct: gamma and phi project the student's 4 channels to the teacher's 8
    q = head.gamma(student).flatten(2).transpose(1, 2)   # query = gamma(student)
    k = teacher.flatten(2).transpose(1, 2)               # key = the teacher feature (theta = identity)
    v = head.phi(student).flatten(2).transpose(1, 2)     # value = phi(student)
    plain = F.mse_loss(torch.softmax(q @ k.transpose(1, 2), -1) @ v, k)  # no 1/sqrt(d); target = teacher
    torch.testing.assert_close(head(student, teacher), plain)
    torch.testing.assert_close(tat.reference_tat(head, student, teacher), plain)
    assert isinstance(head.gamma[0], torch.nn.Conv2d) and head.gamma[0].kernel_size == (3, 3)
    assert head.gamma[0].bias is None and isinstance(head.gamma[1], torch.nn.BatchNorm2d)


@pytest.mark.parametrize("method", list(tat.METHODS))
def test_each_classification_method_trains_and_fastkd_matches_reference(method):
    cfg = tat.config_with(**TINY)
    data = TwoDigitNumbers("train", 16, cfg.canvas)
    torch.manual_seed(1)
    teacher = Classifier(cfg.teacher_backbone, 55, 1).double().eval().requires_grad_(False)
    results = {}
    for impl in ("fastkd", "reference"):
        torch.manual_seed(0)
        student = tat.build_student(method, tat.config_with(**TINY, loss_impl=impl), data, teacher.channels).double()
        terms = tat.make_step(method, cfg, teacher, torch.device("cpu"))(
            student, [data.images.double(), data.targets], epoch=0)
        loss = sum(terms.values())
        loss.backward()
        results[impl] = (loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None])
        expected = {"vanilla": {"ce"}, "kd": {"ce", "kd"}, "tat": {"ce", "tat"}, "tat+kd": {"ce", "kd", "tat"}}
        assert set(terms) == expected[method]
    torch.testing.assert_close(results["fastkd"][0], results["reference"][0], rtol=1e-9, atol=1e-12)
    assert len(results["fastkd"][1]) == len(results["reference"][1])
    for a, b in zip(results["fastkd"][1], results["reference"][1]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_official_classification_weights():
    cfg = tat.config_with(**TINY, **tat.PRESETS["official-weights"])
    data = TwoDigitNumbers("train", 8, cfg.canvas)
    teacher = Classifier(cfg.teacher_backbone, 55, 1).eval().requires_grad_(False)
    batch = [data.images, data.targets]
    torch.manual_seed(0)
    student = tat.build_student("tat+kd", cfg, data, teacher.channels)
    logits, _, raw_tat = student(data.images, teacher(data.images)[1])
    ce = F.cross_entropy(logits, data.targets)
    kl = F.kl_div(F.log_softmax(logits, 1), F.softmax(teacher(data.images)[0], 1), reduction="batchmean")
    terms = tat.make_step("tat+kd", cfg, teacher, torch.device("cpu"))(student, batch, 0)
    torch.testing.assert_close(terms["ce"], 0.5 * ce)
    torch.testing.assert_close(terms["kd"], 0.5 * kl)
    torch.testing.assert_close(terms["tat"], 0.1 * raw_tat)
    torch.manual_seed(0)
    student = tat.build_student("tat", cfg, data, teacher.channels)
    terms = tat.make_step("tat", cfg, teacher, torch.device("cpu"))(student, batch, 0)
    torch.testing.assert_close(terms["ce"], 0.1 * ce)
    torch.testing.assert_close(terms["tat"], 0.2 * raw_tat)


@pytest.mark.parametrize("method", list(tat_seg.METHODS))
def test_each_segmentation_method_trains_and_fastkd_matches_reference(method):
    cfg = tat_seg.config_with(**TINY_SEG)
    data = DigitSegmentation("train", 4, cfg.canvas)
    torch.manual_seed(1)
    teacher = tat_seg.build_net("teacher", cfg, data).double().eval().requires_grad_(False)
    results = {}
    for impl in ("fastkd", "reference"):
        torch.manual_seed(0)
        student = tat_seg.build_student(method, tat_seg.config_with(**TINY_SEG, loss_impl=impl), data).double()
        student.eval()  # no dropout: the same forward twice
        terms = tat_seg.make_step(method, cfg, teacher, torch.device("cpu"))(
            student, [data.images.double(), data.masks], epoch=0)
        loss = sum(terms.values())
        loss.backward()
        results[impl] = (loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None])
        assert set(terms) == ({"ce"} if method == "vanilla" else {"ce", "tat"})
        if method != "vanilla":
            head = student.head
            assert (head.beta > 0, head.gamma > 0) == tat_seg.METHODS[method]
    torch.testing.assert_close(results["fastkd"][0], results["reference"][0], rtol=1e-9, atol=1e-12)
    for a, b in zip(results["fastkd"][1], results["reference"][1]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_students_read_the_teacher_features_computed_once():
    cfg = tat_seg.config_with(**TINY_SEG)
    data = DigitSegmentation("train", 6, cfg.canvas)
    torch.manual_seed(1)
    teacher = tat_seg.build_net("teacher", cfg, data).eval().requires_grad_(False)
    cached = tat_seg.student_data({"train": data}, teacher, cfg, CPU.device)["train"]
    assert isinstance(cached, WithTeacherFeatures) and len(cached) == 6 and cached.num_classes == 11
    torch.testing.assert_close(cached.features, teacher(data.images)[1])
    images, masks, features = (torch.stack(x) for x in zip(*(cached[i] for i in range(6))))
    torch.manual_seed(0)
    student = tat_seg.build_student("tat", cfg, data).eval()
    step = tat_seg.make_step("tat", cfg, teacher, CPU.device)
    torch.testing.assert_close(step(student, [images, masks, features], 0), step(student, [images, masks], 0))
    assert step(student, [images, masks, features + 1], 0)["tat"] != step(student, [images, masks], 0)["tat"]
    vanilla_only = tat_seg.config_with(**TINY_SEG, methods=("vanilla",))
    assert tat_seg.student_data({"train": data}, teacher, vanilla_only, CPU.device)["train"] is data
    with pytest.raises(ValueError, match="eval mode"):
        WithTeacherFeatures(data, teacher.train(), lambda t, x: t(x)[1], CPU.device)


def test_tat_warmup_ramps_the_segmentation_term():
    data = DigitSegmentation("train", 4, SEGMENT)
    torch.manual_seed(1)
    teacher = tat_seg.build_net("teacher", tat_seg.config_with(**TINY_SEG), data).eval().requires_grad_(False)
    torch.manual_seed(0)
    student = tat_seg.build_student("tat", tat_seg.config_with(**TINY_SEG), data).eval()
    batch = [data.images, data.masks]
    full = tat_seg.make_step("tat", tat_seg.config_with(**TINY_SEG), teacher, CPU.device)(student, batch, 0)
    step = tat_seg.make_step("tat", tat_seg.config_with(**TINY_SEG, tat_warmup_epochs=2), teacher, CPU.device)
    for epoch, weight in ((0, 1 / 3), (1, 2 / 3), (2, 1.0), (7, 1.0)):
        terms = step(student, batch, epoch)
        torch.testing.assert_close(terms["tat"], weight * full["tat"])
        torch.testing.assert_close(terms["ce"], full["ce"])


def test_per_image_embedding_bn_is_the_mean_of_one_image_losses():
    """Official per-image BN: the batch loss is the mean of the losses of each image alone (train mode)."""
    torch.manual_seed(0)
    head = HierarchicalTaTLoss(4, 8, grid=(2, 2), groups=2, anchor_grid=(2, 2), alpha=0.5, gamma=0.4,
                               per_image_bn=True).double().train()
    student, teacher = torch.randn(3, 4, 8, 8, dtype=torch.double), torch.randn(3, 8, 8, 8, dtype=torch.double)
    alone = torch.stack([head(student[i:i + 1], teacher[i:i + 1]) for i in range(3)]).mean()
    torch.testing.assert_close(head(student, teacher), alone)
    head.per_image_bn = False  # whole-batch BN statistics: another loss
    assert not torch.allclose(head(student, teacher), alone)


def test_segmentation_options_reach_the_tat_head():
    data = DigitSegmentation("train", 1, SEGMENT)
    cfg = tat_seg.config_with(**TINY_SEG, tat_scale=0.25, embed_bn="batch")
    head = tat_seg.build_student("tat", cfg, data).head
    assert head.scale == 0.25 and not head.per_image_bn
    default = tat_seg.build_student("tat", tat_seg.config_with(**TINY_SEG), data).head
    assert default.scale == 1.0 and default.per_image_bn  # official: scale 1, per-image BN


def test_segmentation_presets_carry_the_official_settings():
    from fastkd.nn.tat_attention_loss import SEGMENTATION_CONFIGS
    for preset, name in (("voc-resnet18", "voc_resnet18"), ("voc-mobilenet", "voc_mobilenet"),
                         ("cocostuff-resnet18", "cocostuff_resnet18"),
                         ("cocostuff-mobilenet", "cocostuff_mobilenet")):
        cfg = tat_seg.config_with(**tat_seg.PRESETS[preset])
        assert cfg.tat_settings() == SEGMENTATION_CONFIGS[name] and cfg.student_decoder_channels == 256
    voc = tat_seg.config_with(**tat_seg.PRESETS["voc-resnet18"])
    assert (voc.lr, voc.batch_size, voc.optimizer, voc.teacher_backbone) == (0.007, 16, "sgd", "resnet101")
    official = tat.config_with(**tat.PRESETS["imagenet-official"])
    assert (official.optimizer, official.lr, official.weight_decay, official.student_epochs, official.lr_milestones,
            official.batch_size) == ("adamw", 1.6e-3, 5e-4, 100, (30, 60, 90), 256)


# ------------------------------------------------------------------------------------------------ CLI, resume, DDP
def test_cli_runs_both_recipes_and_writes_the_reports(tmp_path, capsys):
    cli.main(["tat", "--preset", "smoke", "--out-dir", str(tmp_path / "cls"), "--methods", "vanilla,tat+kd"])
    cli.main(["tat-seg", "--preset", "smoke", "--out-dir", str(tmp_path / "seg"), "--methods", "vanilla,tat"])
    out = capsys.readouterr().out
    assert "| teacher |" in out and "| tat+kd |" in out and "| tat |" in out and "mIoU" in out
    cls = json.loads((tmp_path / "cls" / "results.json").read_text())["histories"]
    seg = json.loads((tmp_path / "seg" / "results.json").read_text())["histories"]
    assert set(cls) == {"teacher", "vanilla", "tat+kd"} and set(seg) == {"teacher", "vanilla", "tat"}
    assert {"top1", "top5"} <= set(cls["tat+kd"][-1]) and len(seg["tat"][-1]["IoU_per_class"]) == 11
    for run in ("cls", "seg"):
        assert (tmp_path / run / "results.png").exists() and (tmp_path / run / "results.md").exists()
    cli.main(["tat-summary", str(tmp_path / "cls"), str(tmp_path / "cls")])
    assert "| tat+kd |" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["tat", "--dataset", "cifar100"], "--dataset cifar100 needs --data-root"),
    (["tat", "--lr-schedule", "warmup-multistep"], "needs --lr-milestones"),
    (["tat", "--methods", "vanilla,crd"], "unknown ['crd']"),
    (["tat-seg", "--student-backbone", "cnn-4-8"], "needs 4 stages"),
    (["tat-seg", "--groups", "3"], "--groups 3 must divide"),
    (["tat-seg", "--dataset", "voc2012", "--data-root", "."], "VOCdevkit/VOC2012"),
    (["tat-seg", "--sbd-root", "."], "--sbd-root needs --dataset voc2012"),
])
def test_bad_options_and_missing_data_are_one_line_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv + ["--out-dir", str(tmp_path)])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("recipe_name", ["tat", "tat-seg"])
def test_a_killed_run_resumes_where_it_stopped(recipe_name, tmp_path, monkeypatch):
    module = tat if recipe_name == "tat" else tat_seg
    killed_method = "tat+kd" if recipe_name == "tat" else "tat"
    common = [recipe_name, "--preset", "smoke", "--student-epochs", "2", "--methods", f"vanilla,{killed_method}"]
    original = module.make_step
    cli.main(common + ["--out-dir", str(tmp_path / "straight")])

    def killed_in_epoch_2(method, *args, **kwargs):
        step = original(method, *args, **kwargs)

        def killable(model, batch, epoch):
            if method == killed_method and epoch == 1:
                raise KeyboardInterrupt("killed")
            return step(model, batch, epoch)
        return killable

    monkeypatch.setattr(module, "make_step", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        cli.main(common + ["--out-dir", str(tmp_path / "killed")])
    monkeypatch.setattr(module, "make_step", original)
    before = (tmp_path / "killed" / "vanilla" / "last.pt").stat().st_mtime_ns
    cli.main(common + ["--out-dir", str(tmp_path / "killed")])
    assert (tmp_path / "killed" / "vanilla" / "last.pt").stat().st_mtime_ns == before  # not retrained
    straight, resumed = (json.loads((tmp_path / d / "results.json").read_text())["histories"]
                         for d in ("straight", "killed"))
    assert without_seconds(resumed) == without_seconds(straight)


def _ddp_worker(rank, world, port, out_dir):
    torchrun_environment(rank, world, port)
    torch.set_num_threads(1)
    cls = tat.config_with(**TINY, out_dir=os.path.join(out_dir, "cls"), device="cpu", train_samples=64,
                          test_samples=37, teacher_epochs=1, student_epochs=1, methods=("tat+kd",))
    seg = tat_seg.config_with(**TINY_SEG, out_dir=os.path.join(out_dir, "seg"), device="cpu", train_samples=32,
                              test_samples=13, teacher_epochs=1, student_epochs=1, methods=("tat",))
    histories = {"cls": tat.run(cls), "seg": tat_seg.run(seg)}
    models = {"cls": tat.build_student("tat+kd", cls, TwoDigitNumbers("train", 1, cls.canvas), 8),
              "seg": tat_seg.build_student("tat", seg, DigitSegmentation("train", 1, seg.canvas))}
    engine.load_weights(models["cls"], os.path.join(out_dir, "cls", "tat+kd"))
    engine.load_weights(models["seg"], os.path.join(out_dir, "seg", "tat"))
    torch.save({"params": {k: [p.detach() for p in m.parameters()] for k, m in models.items()},
                "histories": histories}, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ddp_recipes_on_two_cpu_processes(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for key in ("cls", "seg"):
        for a, b in zip(rank0["params"][key], rank1["params"][key]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert without_seconds(rank0["histories"][key]) == without_seconds(rank1["histories"][key])
    # the gathered evaluations score every test sample once: equal to one process scoring them all
    cls = tat.config_with(**TINY, test_samples=37)
    student = tat.build_student("tat+kd", cls, TwoDigitNumbers("train", 1, cls.canvas), 8)
    engine.load_weights(student, str(tmp_path / "cls" / "tat+kd"))
    single = tat.evaluate(student.eval(), TwoDigitNumbers("test", 37, cls.canvas), cls, CPU)
    assert {k: rank0["histories"]["cls"]["tat+kd"][-1][k] for k in single} == pytest.approx(single)
    seg = tat_seg.config_with(**TINY_SEG, test_samples=13)
    student = tat_seg.build_student("tat", seg, DigitSegmentation("train", 1, seg.canvas))
    engine.load_weights(student, str(tmp_path / "seg" / "tat"))
    single = tat_seg.evaluate(student.eval(), DigitSegmentation("test", 13, seg.canvas), seg, CPU)
    assert rank0["histories"]["seg"]["tat"][-1]["mIoU"] == pytest.approx(single["mIoU"])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_steps_keep_the_tat_terms_in_float32(amp):
    cfg = tat.config_with(**TINY, amp=amp)
    data = TwoDigitNumbers("train", 8, cfg.canvas)
    teacher = Classifier(cfg.teacher_backbone, 55, 1).eval().requires_grad_(False)
    student = tat.build_student("tat+kd", cfg, data, teacher.channels)
    terms = tat.make_step("tat+kd", cfg, teacher, torch.device("cpu"))(student, [data.images, data.targets], 0)
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in terms.values())
    seg = tat_seg.config_with(**TINY_SEG, amp=amp)
    data = DigitSegmentation("train", 4, seg.canvas)
    teacher = tat_seg.build_net("teacher", seg, data).eval().requires_grad_(False)
    student = tat_seg.build_student("tat", seg, data)
    terms = tat_seg.make_step("tat", seg, teacher, torch.device("cpu"))(student, [data.images, data.masks], 0)
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in terms.values())


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="apt-get install dataset-fashion-mnist")
def test_recipe_on_installed_fashion_mnist(tmp_path, capsys):
    cli.main(["tat", "--preset", "smoke", "--dataset", "fashion-mnist", "--max-train-samples", "64",
              "--methods", "tat", "--out-dir", str(tmp_path)])
    assert "fashion-mnist test set" in capsys.readouterr().out
    histories = json.loads((tmp_path / "results.json").read_text())["histories"]
    assert 0 <= histories["tat"][-1]["top1"] <= 100


def test_torchvision_pairs_build_and_distil():
    cfg = tat.config_with(teacher_backbone="resnet34", student_backbone="resnet18")

    class Three:
        num_classes, in_channels = 10, 3
    teacher = Classifier("resnet34", 10).eval().requires_grad_(False)
    student = tat.build_student("tat", cfg, Three, teacher.channels)
    images = torch.randn(2, 3, 64, 64)
    logits, feature, term = student(images, teacher(images)[1])
    assert feature.shape == (2, 512, 2, 2) and student.head.channels == (512, 512) and torch.isfinite(term)
    for backbone in ("resnet18", "mobilenet_v2"):
        logits, feature = DeepLabV3Plus(backbone, 21, decoder_channels=16, aspp_channels=16)(torch.randn(2, 3, 65, 65))
        assert logits.shape == (2, 21, 65, 65) and feature.shape == (2, 16, 17, 17)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_segmentation_backbone_from_a_whole_torchvision_weights_file(backbone, tmp_path):
    import torchvision
    whole = getattr(torchvision.models, backbone)(num_classes=5).state_dict()
    torch.save(whole, tmp_path / "weights.pth")
    cfg = tat_seg.config_with(**{**TINY_SEG, "student_backbone": backbone},
                              student_backbone_weights=str(tmp_path / "weights.pth"))

    class Three:
        num_classes, in_channels = 21, 3
    net = tat_seg.build_net("student", cfg, Three)
    first = net.low[0].weight if backbone == "resnet18" else net.low[0][0].weight
    torch.testing.assert_close(first, whole["conv1.weight" if backbone == "resnet18" else "features.0.0.weight"])
    wrong = tat_seg.config_with(**{**TINY_SEG, "student_backbone": "resnet34"},
                                student_backbone_weights=str(tmp_path / "weights.pth"))
    with pytest.raises(tat_seg.ConfigError, match="does not fit --student-backbone resnet34"):
        tat_seg.build_net("student", wrong, Three)
