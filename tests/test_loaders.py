"""Real-dataset loaders (VOC2007, COCO2014, image lists) on tiny fixtures written into tmp_path: exact targets,
image tensors and their normalisation, the accepted layouts, informative errors, open_dataset, collation."""
import json
import os
import sys

import pytest
import torch
from PIL import Image

from fastkd.data import COCO2014, VOC2007, ImageList, open_dataset
from fastkd.data.images import IMAGENET_MEAN, IMAGENET_STD, load_image
from fastkd.data.voc import VOC_CLASSES

S = 8  # image_size used throughout: fixtures are 10 wide x 14 high, so every load resizes
RED, BLUE = (255, 0, 0), (0, 0, 255)


def normalised(rgb):
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD)])


def write_image(path, color=RED, halves=None):
    """A 10x14 image of one colour, or left half / right half colours when halves is given."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.new("RGB", (10, 14), color)
    if halves:
        image.paste(Image.new("RGB", (5, 14), halves[0]), (0, 0))
        image.paste(Image.new("RGB", (5, 14), halves[1]), (5, 0))
    image.save(path)


# ---------------------------------------------------------------- shared image loading

def test_load_image_shape_dtype_and_imagenet_normalisation(tmp_path):
    write_image(tmp_path / "red.png", RED)
    image = load_image(tmp_path / "red.png", S)
    assert image.shape == (3, S, S) and image.dtype == torch.float32
    torch.testing.assert_close(image, normalised(RED)[:, None, None].expand(3, S, S), rtol=0, atol=1e-6)


def test_augment_is_a_random_horizontal_flip(tmp_path):
    write_image(tmp_path / "halves.png", halves=(RED, BLUE))
    plain = load_image(tmp_path / "halves.png", S)
    assert torch.allclose(plain[:, :, 0], normalised(RED)[:, None].expand(3, S))  # red on the left
    assert not torch.equal(plain, plain.flip(-1))
    torch.manual_seed(0)
    flipped = []
    for _ in range(16):
        out = load_image(tmp_path / "halves.png", S, augment=True)
        assert torch.equal(out, plain) or torch.equal(out, plain.flip(-1))
        flipped.append(torch.equal(out, plain.flip(-1)))
    assert any(flipped) and not all(flipped)


# ---------------------------------------------------------------- VOC2007

def voc_xml(objects):
    body = "".join(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                   f"<difficult>{int(difficult)}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
                   f"<ymax>5</ymax></bndbox></object>" for name, difficult in objects)
    return f"<annotation><folder>VOC2007</folder><size><width>10</width><height>14</height></size>{body}</annotation>"


VOC_IMAGES = {  # id -> objects (name, difficult)
    "000001": [("dog", False)],
    "000002": [("person", False), ("dog", False), ("person", False), ("chair", True)],  # multi-object + difficult
    "000003": [("bottle", True)],                                                      # only a difficult object
    "000004": [("tvmonitor", False), ("aeroplane", False)],
}
VOC_SPLIT_IDS = {"trainval": ["000001", "000002", "000003"], "train": ["000001", "000002"], "test": ["000004"]}


def one_hot(*names):
    row = torch.zeros(len(VOC_CLASSES))
    row[[VOC_CLASSES.index(n) for n in names]] = 1
    return row


@pytest.fixture
def voc_root(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (base / sub).mkdir(parents=True)
    for image_id, objects in VOC_IMAGES.items():
        (base / "Annotations" / f"{image_id}.xml").write_text(voc_xml(objects))
        write_image(base / "JPEGImages" / f"{image_id}.jpg", RED)
    for split, ids in VOC_SPLIT_IDS.items():
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return tmp_path


def test_voc_targets_count_difficult_objects_by_default(voc_root):
    data = VOC2007(voc_root, "trainval", image_size=S)
    expected = torch.stack([one_hot("dog"), one_hot("person", "dog", "chair"), one_hot("bottle")])
    assert data.targets.dtype == torch.float32 and torch.equal(data.targets, expected)
    assert data.num_classes == 20 and data.class_names == list(VOC_CLASSES) and data.in_channels == 3
    assert data.class_names[0] == "aeroplane" and data.class_names[-1] == "tvmonitor" and len(data) == 3
    assert torch.equal(VOC2007(voc_root, "test", image_size=S).targets, one_hot("tvmonitor", "aeroplane")[None])
    assert data.describe() == "voc2007 trainval: 3 images, 20 classes, 1.67 labels/image"


def test_voc_skip_difficult(voc_root):
    data = VOC2007(voc_root, "trainval", image_size=S, skip_difficult=True)
    expected = torch.stack([one_hot("dog"), one_hot("person", "dog"), torch.zeros(20)])
    assert torch.equal(data.targets, expected)


def test_voc_accepts_the_voc2007_directory_itself_and_loads_images(voc_root):
    outer = VOC2007(voc_root, "train", image_size=S)
    inner = VOC2007(voc_root / "VOCdevkit" / "VOC2007", "train", image_size=S)
    assert torch.equal(outer.targets, inner.targets) and outer.paths == inner.paths
    image, target = inner[1]
    assert image.shape == (3, S, S) and image.dtype == torch.float32 and target.dtype == torch.float32
    assert torch.equal(target, one_hot("person", "dog", "chair"))
    # a solid JPEG decodes to within a couple of grey levels of its colour
    torch.testing.assert_close(image, normalised(RED)[:, None, None].expand(3, S, S), rtol=0, atol=3 / 255 / 0.224)


def test_voc_errors_name_the_problem(voc_root):
    base = voc_root / "VOCdevkit" / "VOC2007"
    with pytest.raises(ValueError, match="split must be one of .*'dev'"):
        VOC2007(voc_root, "dev")
    with pytest.raises(FileNotFoundError, match="neither VOCdevkit/VOC2007"):
        VOC2007(voc_root / "VOCdevkit", "train")
    with pytest.raises(FileNotFoundError, match="val.txt"):
        VOC2007(voc_root, "val")
    (base / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000002.jpg"):
        VOC2007(voc_root, "train")
    (base / "Annotations" / "000001.xml").write_text(voc_xml([("dog", False), ("puppy", False)]))
    with pytest.raises(ValueError, match=r"000001\.xml: unknown class name 'puppy'"):
        VOC2007(voc_root, "train")


# ---------------------------------------------------------------- COCO2014

def write_coco(root, split="val"):
    instances = {
        "images": [{"id": 10, "file_name": "a.jpg", "width": 10, "height": 14},
                   {"id": 3, "file_name": "b.jpg", "width": 10, "height": 14},
                   {"id": 7, "file_name": "c.jpg", "width": 10, "height": 14}],   # no annotation
        "categories": [{"id": 90, "name": "toothbrush", "supercategory": "indoor"},
                       {"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 5, "name": "airplane", "supercategory": "vehicle"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 5, "iscrowd": 0, "bbox": [0, 0, 2, 2], "area": 4.0},
            {"id": 2, "image_id": 10, "category_id": 90, "iscrowd": 1, "bbox": [0, 0, 2, 2], "area": 4.0},
            {"id": 3, "image_id": 3, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 2, 2], "area": 4.0},
            {"id": 4, "image_id": 3, "category_id": 1, "iscrowd": 0, "bbox": [1, 1, 2, 2], "area": 4.0}],
    }
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(instances))
    for name, color in (("a.jpg", RED), ("b.jpg", BLUE), ("c.jpg", RED)):
        write_image(root / f"{split}2014" / name, color)


def test_coco_contiguous_categories_empty_images_and_crowds(tmp_path):
    pytest.importorskip("pycocotools")
    write_coco(tmp_path)
    data = COCO2014(tmp_path, "val", image_size=S)
    assert data.class_names == ["person", "airplane", "toothbrush"] and data.num_classes == 3  # ids 1, 5, 90
    assert data.image_ids == [3, 7, 10]
    assert data.paths == [os.path.join(tmp_path, "val2014", n) for n in ("b.jpg", "c.jpg", "a.jpg")]
    assert torch.equal(data.targets, torch.tensor([[1., 0, 0], [0, 0, 0], [0, 1, 1]]))
    image, target = data[0]
    assert image.shape == (3, S, S) and torch.equal(target, torch.tensor([1., 0, 0]))
    assert image[2].mean() > 2 and image[0].mean() < -1  # b.jpg is blue
    assert isinstance(open_dataset("coco2014", tmp_path, "val", image_size=S), COCO2014)


def test_coco_errors(tmp_path, monkeypatch):
    pytest.importorskip("pycocotools")
    write_coco(tmp_path)
    with pytest.raises(ValueError, match="split must be one of .*'test'"):
        COCO2014(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="instances_train2014.json"):
        COCO2014(tmp_path, "train")
    (tmp_path / "val2014" / "c.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="c.jpg"):
        COCO2014(tmp_path, "val")
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install pycocotools"):
        COCO2014(tmp_path, "val")


# ---------------------------------------------------------------- image lists

@pytest.fixture
def list_root(tmp_path):
    write_image(tmp_path / "images" / "red.png", RED)
    write_image(tmp_path / "images" / "blue.png", BLUE)
    write_image(tmp_path / "images" / "sub" / "c.png", RED)
    (tmp_path / "classes.txt").write_text("sky\nwater\nperson\ndog\n")
    (tmp_path / "train.txt").write_text("images/red.png 1 0 0 1\nimages/blue.png 0 0 0 0\n\n"
                                        "images/sub/c.png\t0 1 1 0\n")
    return tmp_path


def test_image_list_targets_names_and_images(list_root):
    data = ImageList(list_root, "train", image_size=S)
    assert data.class_names == ["sky", "water", "person", "dog"] and data.num_classes == 4 and len(data) == 3
    assert torch.equal(data.targets, torch.tensor([[1., 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0]]))
    image, target = data[1]
    assert image.shape == (3, S, S) and image.dtype == torch.float32
    torch.testing.assert_close(image, normalised(BLUE)[:, None, None].expand(3, S, S), rtol=0, atol=1e-6)
    assert torch.equal(target, torch.zeros(4))
    assert data.describe() == "image-list train: 3 images, 4 classes, 1.33 labels/image"
    (list_root / "classes.txt").unlink()
    assert ImageList(list_root, "train", image_size=S).class_names == ["0", "1", "2", "3"]


@pytest.mark.parametrize("rows, message", [
    ("images/red.png 1 0 0 1\nimages/blue.png 1 0 1\n", r"train\.txt:2: expected an image path then 4 labels, found 3"),
    ("images/red.png 1 0 2 1\n", r"train\.txt:1: labels must be 0 or 1, found '2'"),
    ("images/red.png\n", r"train\.txt:1: expected an image path then 4 labels, found 0"),
    ("images/red.png 1 0 0 1\nimages/gone.png 0 0 0 1\n", r"image not found: .*images/gone\.png"),
    ("\n", r"train\.txt: no images listed"),
])
def test_image_list_bad_rows(list_root, rows, message):
    (list_root / "train.txt").write_text(rows)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ImageList(list_root, "train")


def test_image_list_without_classes_needs_consistent_rows_and_a_split_file(list_root):
    (list_root / "classes.txt").unlink()
    (list_root / "train.txt").write_text("images/red.png 1 0\nimages/blue.png 0 1 1\n")
    with pytest.raises(ValueError, match=r"train\.txt:2: expected an image path then 2 labels, found 3"):
        ImageList(list_root, "train")
    with pytest.raises(FileNotFoundError, match=r"split 'val' not found: .*val\.txt"):
        ImageList(list_root, "val")


# ---------------------------------------------------------------- open_dataset and collation

def test_open_dataset_dispatch_and_dataloader_collation(voc_root, tmp_path):
    list_root = tmp_path / "list"
    write_image(list_root / "a.png", RED)
    write_image(list_root / "b.png", BLUE)
    (list_root / "val.txt").write_text("a.png 0 1 1\nb.png 1 0 0\n")
    with pytest.raises(ValueError, match=r"must be one of \['coco2014', 'image-list', 'voc2007'\], got 'voc2012'"):
        open_dataset("voc2012", voc_root, "train")
    voc = open_dataset("voc2007", voc_root, "trainval", image_size=S, augment=True)
    images = open_dataset("image-list", list_root, "val", image_size=S)
    assert isinstance(voc, VOC2007) and voc.augment and isinstance(images, ImageList)
    for data in (voc, images):
        batches = list(torch.utils.data.DataLoader(data, batch_size=2))
        assert [b[0].shape for b in batches] == [(min(2, len(data) - i), 3, S, S) for i in range(0, len(data), 2)]
        assert all(b[0].dtype == b[1].dtype == torch.float32 for b in batches)
        assert torch.equal(torch.cat([b[1] for b in batches]), data.targets)
