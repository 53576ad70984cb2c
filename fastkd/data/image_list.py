"""A generic multi-label image list (NUS-WIDE style): images plus a 0/1 label row per image.

Layout: root/{split}.txt, one image a line: its path relative to root (no whitespace in it), then one 0/1
label per class, whitespace-separated; blank lines are skipped. Optional root/classes.txt: one class name a
line, fixing the number of classes; without it the classes are named "0".."K-1", K taken from the first row.
Images with no positive label are kept (all-zero target).
"""
import os

import torch

from fastkd.data.images import MultiLabelImages


def read_classes(path: str) -> list[str]:
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{path}: expected one distinct class name a line, got {names!r}")
    return names


class ImageList(MultiLabelImages):
    """Split `split` of an image list as (image (3, S, S), target (K,)); see the module docstring for layout."""

    def __init__(self, root: str | os.PathLike, split: str, image_size: int = 224, augment: bool = False):
        list_path = os.path.join(root, f"{split}.txt")
        if not os.path.isfile(list_path):
            raise FileNotFoundError(f"image list for split {split!r} not found: {list_path}")
        classes_path = os.path.join(root, "classes.txt")
        names = read_classes(classes_path) if os.path.isfile(classes_path) else None
        paths, rows = [], []
        with open(list_path) as f:
            for line_number, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                labels = fields[1:]
                expected = len(names) if names is not None else len(rows[0]) if rows else None
                if not labels or (expected is not None and len(labels) != expected):
                    raise ValueError(f"{list_path}:{line_number}: expected an image path then "
                                     f"{expected or 'at least 1'} labels, found {len(labels)} labels")
                bad = [v for v in labels if v not in ("0", "1")]
                if bad:
                    raise ValueError(f"{list_path}:{line_number}: labels must be 0 or 1, found {bad[0]!r}")
                paths.append(os.path.join(root, fields[0]))
                rows.append([v == "1" for v in labels])
        if not rows:
            raise ValueError(f"{list_path}: no images listed")
        targets = torch.tensor(rows, dtype=torch.float32)
        if names is None:
            names = [str(k) for k in range(targets.shape[1])]
        super().__init__(paths, targets, names, image_size, augment, "image-list", split)
