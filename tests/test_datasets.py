"""Every dataset loader, on small stand-ins written in torchvision's on-disk layout (no download here).

Each image's pixel values encode (image, channel, row, column), so a loader that swapped rows and columns,
mixed up channels or mislabelled an image fails; each label encodes the image it belongs to.
"""

import pickle
import struct

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, DataConfig
from pipeline.data import DATASETS, BatchSource, load_split

TRAIN, TEST = 6, 4


def _images(count, spec, offset):
    n, c, h, w = np.meshgrid(np.arange(count) + offset, np.arange(spec.channels), np.arange(spec.size),
                             np.arange(spec.size), indexing="ij")
    return ((n * 7 + c * 31 + h * 3 + w * 5) % 256).astype(np.uint8)  # (N, C, H, W)


def _labels(count, spec, offset):
    return ((np.arange(count) + offset) * 3 % spec.classes).astype(np.int64)


def _split(spec, train):
    count, offset = (TRAIN, 0) if train else (TEST, 100)
    return _images(count, spec, offset), _labels(count, spec, offset)


def _write_idx(path, array):
    magic = {3: 0x0803, 1: 0x0801}[array.ndim]  # unsigned bytes, 3 or 1 dimensions
    path.write_bytes(struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes())


def _mnist_like(root, folder, spec):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, train in (("train", True), ("t10k", False)):
        images, labels = _split(spec, train)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:, 0])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


def _cifar(root, spec, hundred):
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir()
    key = "fine_labels" if hundred else "labels"

    def dump(name, images, labels):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images.reshape(len(images), -1), key: labels.tolist()}, f)

    images, labels = _split(spec, True)
    if hundred:
        dump("train", images, labels)
    else:  # five training files, read in order
        for part, rows in enumerate(np.array_split(np.arange(TRAIN), 5), start=1):
            dump(f"data_batch_{part}", images[rows], labels[rows])
    dump("test" if hundred else "test_batch", *_split(spec, False))
    names = [f"class{k}" for k in range(spec.classes)]
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump({"fine_label_names" if hundred else "label_names": names}, f)


def _svhn(root, spec):
    import scipy.io

    images, labels = _split(spec, True)
    parts = {"train": (images[:4], labels[:4]), "extra": (images[4:], labels[4:]), "test": _split(spec, False)}
    for split, (x, y) in parts.items():  # stored (H, W, C, N), labels 1..10 with 10 for the digit 0
        scipy.io.savemat(str(root / f"{split}_32x32.mat"), {"X": x.transpose(2, 3, 1, 0), "y": np.where(y == 0, 10, y)[:, None]})


def _stl10(root, spec):
    folder = root / "stl10_binary"
    folder.mkdir()
    for split in ("train", "test"):  # column-major images, labels 1..10
        images, labels = _split(spec, split == "train")
        (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())
        (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())


WRITERS = {
    "fashion-mnist": lambda root, spec: _mnist_like(root, "FashionMNIST", spec),
    "kmnist": lambda root, spec: _mnist_like(root, "KMNIST", spec),
    "cifar10": lambda root, spec: _cifar(root, spec, hundred=False),
    "cifar100": lambda root, spec: _cifar(root, spec, hundred=True),
    "svhn": _svhn,
    "stl10": _stl10,
}


@pytest.fixture
def stand_ins(monkeypatch):
    # torchvision checks the real files' MD5 sums; the stand-ins cannot match them
    for module in ("cifar", "svhn", "stl10"):
        monkeypatch.setattr(f"torchvision.datasets.{module}.check_integrity", lambda *args, **kwargs: True)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_each_loader_reads_its_layout_as_nchw_images_and_labels(stand_ins, tmp_path, name):
    spec = DATASETS[name]
    WRITERS[name](tmp_path, spec)
    for train in (True, False):
        images, labels = _split(spec, train)
        loaded = load_split(name, str(tmp_path), train, download=False)
        assert loaded.images.dtype == torch.uint8 and loaded.labels.dtype == torch.int64
        assert loaded.images.shape == (len(labels), spec.channels, spec.size, spec.size)
        assert torch.equal(loaded.images, torch.from_numpy(images)), f"{name}: pixels moved"
        assert torch.equal(loaded.labels, torch.from_numpy(labels)), f"{name}: labels differ"


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_each_dataset_gives_normalised_training_batches(stand_ins, tmp_path, name):
    spec = DATASETS[name]
    WRITERS[name](tmp_path, spec)
    source = BatchSource(DataConfig(dataset=name, data_dir=str(tmp_path), download=False, batch_size=4), seed=1)
    batch = next(source.train_batches(epoch=1))
    assert batch.x.shape == (4, spec.channels, spec.size, spec.size) and batch.x.dtype == torch.float32
    assert source.num_train_batches == 2 and source.num_eval_batches == 1
    test = next(source.eval_batches())  # no augmentation: the first test images, normalised with the spec
    images, labels = _split(spec, False)
    mean, std = torch.tensor(spec.mean).view(1, -1, 1, 1), torch.tensor(spec.std).view(1, -1, 1, 1)
    expected = (torch.from_numpy(images).float() / 255 - mean) / std
    torch.testing.assert_close(test.x, expected)
    assert torch.equal(test.y, torch.from_numpy(labels))


def test_svhn_without_scipy_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a))
    with pytest.raises(ConfigError, match=r"reads SVHN's MATLAB files with scipy, which is not installed: pip install scipy"):
        load_split("svhn", str(tmp_path), True, download=False)
