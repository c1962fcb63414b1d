"""Shared fixtures: where the real MNIST is (PIPELINE_DATA_DIR, which .ci/run sets to ../shared/data)."""

import os

import pytest


@pytest.fixture
def mnist_root():
    root = os.environ.get("PIPELINE_DATA_DIR")
    if not root or not os.path.isdir(os.path.join(root, "MNIST", "raw")):
        pytest.skip("real MNIST not available: set PIPELINE_DATA_DIR (as .ci/run does)")
    return root
