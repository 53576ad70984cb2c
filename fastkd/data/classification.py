"""Real single-label classification datasets on local disk (never downloaded), as (image float32 (C, H, W),
label long) Datasets with `num_classes` and `in_channels`:

- fashion-mnist: the four standard idx files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-...), plain
  or .gz, in one folder (the Debian package dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist);
- cifar100: the python-pickle layout (cifar-100-python/{train,test,meta}) read by torchvision's CIFAR100, without
  its download checksums (so that a re-packed copy or a test fixture loads too);
- imagenet: the ImageFolder layout, root/train/CLASS/*.JPEG and root/val/CLASS/*.JPEG (torchvision ImageFolder).

Training images are augmented as the usual recipes: CIFAR random crop 32 (padding 4) + flip; ImageNet
RandomResizedCrop + flip, evaluation resize to 8/7 of the side then centre crop (256 -> 224); Fashion-MNIST none.
"""
import gzip
import os

import numpy as np
import torch

CLASSIFICATION_DATASETS = ("fashion-mnist", "cifar100", "imagenet")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def read_idx(path: str) -> np.ndarray:
    """An idx file (the MNIST format: magic 0 0 type ndim, big-endian sizes, data), plain or gzip-compressed."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=_IDX_TYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape}, the file holds {array.size} values")
    return array.reshape(shape)


def _find(root: str, stem: str) -> str:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    raise FileNotFoundError(f"fashion-mnist: {stem}(.gz) not found in {root!r} (apt-get install "
                            f"dataset-fashion-mnist installs the files in {FASHION_MNIST_DIR})")


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST from its idx files: (image float32 (1, 28, 28) normalised, label long), 10 classes."""

    in_channels, num_classes = 1, 10
    MEAN, STD = 0.2860, 0.3530

    def __init__(self, root: str, split: str):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        prefix = "train" if split == "train" else "t10k"
        images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"fashion-mnist {split}: images {images.shape} and labels {labels.shape} do not match")
        self.images = (torch.from_numpy(images.astype(np.float32)) / 255.0 - self.MEAN) / self.STD
        self.targets = torch.from_numpy(labels.astype(np.int64))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index][None], self.targets[index]


def _cifar100_class():
    import torchvision

    class CIFAR100(torchvision.datasets.CIFAR100):
        """torchvision's CIFAR100 without the md5 checks of its downloaded files (present files are trusted)."""
        train_list = [[name, None] for name, _ in torchvision.datasets.CIFAR100.train_list]
        test_list = [[name, None] for name, _ in torchvision.datasets.CIFAR100.test_list]
        meta = {**torchvision.datasets.CIFAR100.meta, "md5": None}

    return CIFAR100


class _Labelled(torch.utils.data.Dataset):
    """A torchvision dataset with our attributes (num_classes, in_channels) and long labels."""

    def __init__(self, dataset, num_classes: int, in_channels: int = 3):
        self.dataset, self.num_classes, self.in_channels = dataset, num_classes, in_channels

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return image, torch.tensor(label, dtype=torch.long)


def open_classification(name: str, root: str, split: str, image_size: int = 224, augment: bool = False):
    """The real dataset `name` (CLASSIFICATION_DATASETS) under root; split "train" or "test" (ImageNet: val)."""
    if name not in CLASSIFICATION_DATASETS:
        raise ValueError(f"dataset must be one of {CLASSIFICATION_DATASETS}, got {name!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{name}: data root {root!r} is not a directory")
    if name == "fashion-mnist":
        return FashionMNIST(root, split)
    from torchvision import transforms
    if name == "cifar100":
        normalise = transforms.Normalize(CIFAR_MEAN, CIFAR_STD)
        steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
        try:
            dataset = _cifar100_class()(root, train=split == "train",
                                        transform=transforms.Compose([*steps, transforms.ToTensor(), normalise]))
        except RuntimeError as error:
            raise FileNotFoundError(f"cifar100: {root!r} must hold cifar-100-python/train, test and meta "
                                    f"({error})") from None
        return _Labelled(dataset, 100)
    folder = os.path.join(root, "train" if split == "train" else "val")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"imagenet: {folder!r} not found (the ImageFolder layout: root/train/CLASS/*, "
                                f"root/val/CLASS/*)")
    normalise = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if augment:
        steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(image_size * 8 // 7), transforms.CenterCrop(image_size)]
    import torchvision
    dataset = torchvision.datasets.ImageFolder(folder, transform=transforms.Compose(
        [*steps, transforms.ToTensor(), normalise]))
    return _Labelled(dataset, len(dataset.classes))
