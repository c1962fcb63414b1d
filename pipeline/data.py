"""Data source: torchvision datasets or synthetic data as numbered, augmented, normalised batches (x, y)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.model.seeding import generator

if TYPE_CHECKING:
    from pipeline.config import DataConfig


@dataclass(frozen=True, slots=True)
class DatasetSpec:
    """Shape, classes, normalisation and training augmentation of one dataset (as in the reference code)."""

    channels: int
    size: int
    classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 0  # random crop of `size` after zero padding; 0 = no crop
    hflip: bool = False  # random horizontal flips
    train_examples: int = 0  # size of the training split (judged against --batch-size before a run)


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(1, 28, 10, (0.1307,), (0.3081,), crop_padding=2, train_examples=60_000),
    "fashion-mnist": DatasetSpec(1, 28, 10, (0.286,), (0.353,), crop_padding=2, hflip=True, train_examples=60_000),
    "kmnist": DatasetSpec(1, 28, 10, (0.1904,), (0.3475,), train_examples=60_000),
    "cifar10": DatasetSpec(3, 32, 10, (0.424, 0.415, 0.384), (0.283, 0.278, 0.284), crop_padding=4, hflip=True, train_examples=50_000),
    "cifar100": DatasetSpec(3, 32, 100, (0.438, 0.418, 0.377), (0.300, 0.287, 0.294), crop_padding=4, hflip=True, train_examples=50_000),
    "svhn": DatasetSpec(3, 32, 10, (0.431, 0.430, 0.446), (0.197, 0.198, 0.199), train_examples=73_257),
    "stl10": DatasetSpec(3, 96, 10, (0.447, 0.440, 0.407), (0.260, 0.257, 0.271), train_examples=5_000),
}


@dataclass(slots=True)
class Batch:
    """One numbered batch: inputs (B, C, H, W) float32 normalised, labels (B,) int64."""

    index: int
    x: torch.Tensor
    y: torch.Tensor


@dataclass(slots=True)
class ImageSet:
    """A split held in memory as uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor


def _as_nchw(images) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.dim() == 3:  # (N, H, W): grey images
        return images.unsqueeze(1).contiguous()
    if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):  # (N, H, W, C), as CIFAR stores them
        return images.permute(0, 3, 1, 2).contiguous()
    return images.contiguous()


def _torchvision_split(name: str, root: str, train: bool, download: bool) -> ImageSet:
    from torchvision import datasets

    if name in ("mnist", "fashion-mnist", "kmnist"):
        cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "kmnist": datasets.KMNIST}[name]
        ds = cls(root=root, train=train, download=download)
        return ImageSet(_as_nchw(ds.data), torch.as_tensor(ds.targets, dtype=torch.int64))
    if name in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        ds = cls(root=root, train=train, download=download)
        return ImageSet(_as_nchw(ds.data), torch.as_tensor(ds.targets, dtype=torch.int64))
    if name == "svhn":  # the reference trains on train + extra
        if importlib.util.find_spec("scipy") is None:
            raise ConfigError("--dataset svhn: torchvision reads SVHN's MATLAB files with scipy, which is not "
                              "installed: pip install scipy (or the extra: pip install -e '.[svhn]')")
        splits = ("train", "extra") if train else ("test",)
        parts = [datasets.SVHN(root=root, split=s, download=download) for s in splits]
        images = torch.cat([_as_nchw(p.data) for p in parts])
        labels = torch.cat([torch.as_tensor(p.labels, dtype=torch.int64) for p in parts])
        return ImageSet(images, labels)
    if name == "stl10":
        ds = datasets.STL10(root=root, split="train" if train else "test", download=download)
        return ImageSet(_as_nchw(ds.data), torch.as_tensor(ds.labels, dtype=torch.int64))
    raise ConfigError(f"unknown dataset '{name}'")


def load_split(name: str, root: str, train: bool, download: bool) -> ImageSet:
    """Load a split of a torchvision dataset; a missing dataset that cannot be downloaded is a ConfigError."""
    try:
        return _torchvision_split(name, root, train, download)
    except ConfigError:
        raise
    except Exception as exc:  # torchvision raises RuntimeError when missing, URLError/OSError when offline
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "point --data-dir at a copy" if download else "point --data-dir at a copy or allow --download"
        raise ConfigError(f"{name} not found under '{root}' and not downloadable ({reason}): {hint}") from None


def synthetic_split(spec: DatasetSpec, size: int, seed: int, train: bool) -> ImageSet:
    """Random uint8 images of the spec's shape, learnable: each class adds a fixed smooth template to noise.

    The templates are 4x4 random patterns upsampled to the image size, so crops and flips keep them recognisable.
    """
    gen = generator(seed, "synthetic-templates")
    coarse = torch.rand(spec.classes, spec.channels, 4, 4, generator=gen) * 255
    templates = F.interpolate(coarse, size=(spec.size, spec.size), mode="bilinear", align_corners=False)
    gen = generator(seed, "synthetic", "train" if train else "test")
    labels = torch.randint(0, spec.classes, (size,), generator=gen)
    noise = torch.rand(size, spec.channels, spec.size, spec.size, generator=gen) * 255
    images = (0.3 * templates[labels] + 0.7 * noise).round().to(torch.uint8)
    return ImageSet(images, labels)


def random_crop(images: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Crop every image (B, C, H, W) at its own (row, col) offset (B, 2) from the zero-padded batch."""
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = (offsets[:, 0:1] + torch.arange(height, device=images.device)).view(batch, 1, height, 1)
    cols = (offsets[:, 1:2] + torch.arange(width, device=images.device)).view(batch, 1, 1, width)
    b = torch.arange(batch, device=images.device).view(batch, 1, 1, 1)
    c = torch.arange(channels, device=images.device).view(1, channels, 1, 1)
    return padded[b, c, rows, cols]


class BatchSource:
    """The data source of a run: the same batches, in the same order, in every process and mode."""

    def __init__(self, cfg: DataConfig, seed: int, device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.seed = seed
        self.device = torch.device(device)
        self.spec = DATASETS[cfg.shape_source]
        if cfg.dataset == "synthetic":
            self.train_set = synthetic_split(self.spec, cfg.synthetic_train_size, seed, train=True)
            self.test_set = synthetic_split(self.spec, cfg.synthetic_test_size, seed, train=False)
        else:
            self.train_set = load_split(cfg.dataset, cfg.data_dir, True, cfg.download)
            self.test_set = load_split(cfg.dataset, cfg.data_dir, False, cfg.download)
        shape = tuple(self.train_set.images.shape[1:])
        expected = (self.spec.channels, self.spec.size, self.spec.size)
        if shape != expected:
            raise ConfigError(f"{cfg.dataset} under '{cfg.data_dir}' has images of shape {shape}, expected {expected}")
        mean = torch.tensor(self.spec.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.spec.std, device=self.device).view(1, -1, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), -mean / std  # x = u8 / 255 normalised by (mean, std)

    @staticmethod
    def shape_of(cfg: DataConfig) -> tuple[tuple[int, int, int], int]:
        """(input shape (C, H, W), classes) of a data config, without loading anything."""
        spec = DATASETS[cfg.shape_source]
        return (spec.channels, spec.size, spec.size), spec.classes

    @property
    def num_classes(self) -> int:
        return self.spec.classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.spec.channels, self.spec.size, self.spec.size)

    def _count(self, n: int, limit: int | None) -> int:
        batches = -(-n // self.cfg.batch_size)
        return batches if limit is None else min(batches, limit)

    @property
    def num_train_batches(self) -> int:
        """Training batches per epoch; a last batch of a single example is dropped (batch norm cannot train on one;
        the next epoch's order differs, so no example is left out for good)."""
        examples, size = len(self.train_set.labels), self.cfg.batch_size
        if size > 1 and examples % size == 1:
            examples -= 1
        return self._count(examples, self.cfg.limit_train_batches)

    @property
    def num_eval_batches(self) -> int:
        return self._count(len(self.test_set.labels), self.cfg.limit_eval_batches)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A batch tensor on the run's device: on a GPU through pinned memory, copied without blocking on the
        current stream (the caching host allocator keeps the pinned block until that copy is done)."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return self._to_device(images).to(torch.float32) * self._scale + self._shift

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Shuffled, augmented training batches of an epoch, from batch `start` on (same order for a given epoch)."""
        gen = generator(self.seed, "data-order", epoch)
        order = torch.randperm(len(self.train_set.labels), generator=gen)
        size, spec = self.cfg.batch_size, self.spec
        for index in range(start, self.num_train_batches):
            picked = order[index * size:(index + 1) * size]
            # The augmentation draws come from their own generator per batch so that any batch can be made alone.
            aug = generator(self.seed, "augment", epoch, index)
            images = self.train_set.images[picked]
            if self.cfg.augment and spec.crop_padding:
                offsets = torch.randint(0, 2 * spec.crop_padding + 1, (len(picked), 2), generator=aug)
                images = random_crop(images, spec.crop_padding, offsets)
            if self.cfg.augment and spec.hflip:
                flip = torch.rand(len(picked), generator=aug) < 0.5
                images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            yield Batch(index, self._normalise(images), self._to_device(self.train_set.labels[picked]))

    def eval_batches(self) -> Iterator[Batch]:
        """The test split in order, without augmentation."""
        size = self.cfg.batch_size
        for index in range(self.num_eval_batches):
            sl = slice(index * size, (index + 1) * size)
            yield Batch(index, self._normalise(self.test_set.images[sl]), self._to_device(self.test_set.labels[sl]))


def check_available(cfg: DataConfig) -> None:
    """Make sure a real dataset can be loaded (downloading it if allowed) before any stage process starts."""
    if cfg.dataset != "synthetic":
        for train in (True, False):
            load_split(cfg.dataset, cfg.data_dir, train, cfg.download)
