"""The data source: same batches for the same seed, the reference's normalisation and augmentations."""

import pytest
import torch

from pipeline.config import ConfigError, DataConfig
from pipeline.data import DATASETS, BatchSource, load_split, random_crop, synthetic_split


def _source(**kw):
    cfg = DataConfig(dataset="synthetic", synthetic_train_size=100, synthetic_test_size=30, batch_size=32, **kw)
    return BatchSource(cfg, seed=7)


def test_batches_are_numbered_and_cover_the_split_with_a_smaller_last_batch():
    src = _source()
    batches = list(src.train_batches(epoch=1))
    assert [b.index for b in batches] == [0, 1, 2, 3]
    assert [len(b.y) for b in batches] == [32, 32, 32, 4]
    assert src.num_train_batches == 4 and src.num_eval_batches == 1
    assert batches[0].x.shape == (32, 1, 28, 28) and batches[0].x.dtype == torch.float32


def test_a_last_training_batch_of_one_is_dropped_and_test_batches_are_all_kept():
    cfg = DataConfig(dataset="synthetic", synthetic_train_size=65, synthetic_test_size=33, batch_size=32)
    src = BatchSource(cfg, seed=7)
    assert [len(b.y) for b in src.train_batches(epoch=1)] == [32, 32]  # batch norm cannot train on one example
    assert [len(b.y) for b in src.eval_batches()] == [32, 1] and src.num_train_batches == 2
    ones = BatchSource(DataConfig(dataset="synthetic", synthetic_train_size=3, synthetic_test_size=3, batch_size=1), seed=7)
    assert ones.num_train_batches == 3  # batches of one by choice: kept (refused before start with batch norm)


def test_same_seed_and_epoch_give_identical_batches_other_epochs_differ():
    a = list(_source().train_batches(epoch=2))
    b = list(_source().train_batches(epoch=2))
    c = list(_source().train_batches(epoch=3))
    assert all(torch.equal(p.x, q.x) and torch.equal(p.y, q.y) for p, q in zip(a, b))
    assert not torch.equal(a[0].y, c[0].y)


def test_starting_mid_epoch_gives_the_tail_of_the_same_epoch():
    full = list(_source().train_batches(epoch=1))
    tail = list(_source().train_batches(epoch=1, start=2))
    assert [b.index for b in tail] == [2, 3]
    assert all(torch.equal(p.x, q.x) for p, q in zip(full[2:], tail))


def test_limits_cut_the_epoch():
    src = _source(limit_train_batches=2, limit_eval_batches=1)
    assert len(list(src.train_batches(1))) == 2 and len(list(src.eval_batches())) == 1


def test_random_crop_matches_cropping_the_padded_image_by_hand():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    offsets = torch.tensor([[0, 0], [2, 1]])
    out = random_crop(images, 1, offsets)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    assert torch.equal(out[0], padded[0, :, 0:4, 0:4])
    assert torch.equal(out[1], padded[1, :, 2:6, 1:5])


def test_synthetic_data_is_learnable_class_templates():
    spec = DATASETS["cifar10"]
    split = synthetic_split(spec, 200, seed=1, train=True)
    assert split.images.shape == (200, 3, 32, 32) and split.images.dtype == torch.uint8
    # images of one class are closer to each other than to another class's images
    x = split.images.float().flatten(1)
    y = split.labels
    a, b = x[y == 0], x[y == 1]
    within = torch.cdist(a, a).mean()
    across = torch.cdist(a, b).mean()
    assert within < across


def test_mnist_matches_torchvision_transforms(mnist_root):
    from torchvision import datasets, transforms

    cfg = DataConfig(dataset="mnist", data_dir=mnist_root, batch_size=16, download=False)
    src = BatchSource(cfg, seed=0)
    assert len(src.train_set.labels) == 60000 and len(src.test_set.labels) == 10000
    first = next(src.eval_batches())
    reference = datasets.MNIST(mnist_root, train=False, transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]))
    expected = torch.stack([reference[i][0] for i in range(16)])
    assert torch.allclose(first.x, expected, atol=1e-5)
    assert torch.equal(first.y, torch.tensor([reference[i][1] for i in range(16)]))
    counts = torch.bincount(src.train_set.labels, minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_mnist_augmentation_is_a_two_pixel_jitter(mnist_root):
    cfg = DataConfig(dataset="mnist", data_dir=mnist_root, batch_size=64, download=False)
    src = BatchSource(cfg, seed=0)
    plain = BatchSource(DataConfig(dataset="mnist", data_dir=mnist_root, batch_size=64, download=False, augment=False), seed=0)
    augmented, clean = next(src.train_batches(1)), next(plain.train_batches(1))
    assert torch.equal(augmented.y, clean.y)  # same order, only the pixels move
    background = augmented.x.min()
    # every augmented image equals its clean image shifted by some (dr, dc) in [-2, 2]^2
    for a, c in zip(augmented.x[:8], clean.x[:8]):
        padded = torch.nn.functional.pad(c - background, (2, 2, 2, 2)) + background
        matches = [torch.allclose(a, padded[:, r:r + 28, s:s + 28]) for r in range(5) for s in range(5)]
        assert any(matches)


def test_missing_dataset_without_download_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_split("mnist", str(tmp_path), train=True, download=False)
