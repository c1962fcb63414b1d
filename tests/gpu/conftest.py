"""GPU acceptance tests (marker `cuda`): skipped with a reason where no CUDA GPU is visible; shared references."""

import os

import pytest
import torch

from pipeline.sequential import SequentialTrainer
from test_equivalence import _results

# The sequential references run in this pytest process and share its CUDA context, so cuBLAS must see its
# reproducible workspace setting before the first test touches the GPU (see [Note: determinism] in
# pipeline/run/determinism.py); the stage processes inherit it.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU visible (run them on a GPU: bash benchmarks/gpu_check.sh)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_gpu(monkeypatch):
    """Every stage on the first visible GPU (the one-GPU emulation), however many GPUs the machine has."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", first)  # read by the stage processes, spawned after this


@pytest.fixture(scope="session")
def sequential_reference(tmp_path_factory):
    """reference(name, make): (summary, epochs, weights) of the sequential trainer on make(), run once per name."""
    cache = {}

    def reference(name, make):
        if name not in cache:
            out = tmp_path_factory.mktemp(f"sequential-{name}")
            SequentialTrainer(make(run__out=str(out))).run()
            cache[name] = _results(out)
        return cache[name]

    return reference
