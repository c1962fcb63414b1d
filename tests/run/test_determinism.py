"""--deterministic: torch's deterministic switches, set in every process, and the pipeline still equals the reference."""

import json
import os

import pytest
import torch

from pipeline.run.launcher import launch
from pipeline.cli import main
from pipeline.run.determinism import use_deterministic
from pipeline.sequential import SequentialTrainer
from test_equivalence import _assert_same, _mlp, _results


def _switches() -> dict:
    return {"algorithms": torch.are_deterministic_algorithms_enabled(), "cudnn": torch.backends.cudnn.deterministic,
            "benchmark": torch.backends.cudnn.benchmark, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "workspace": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


@pytest.fixture
def restored_switches():
    """These are process-wide: put back what the test found, so that later tests run with torch's defaults."""
    before = _switches()
    yield before
    torch.use_deterministic_algorithms(before["algorithms"])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before["cudnn"], before["benchmark"]
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before["cudnn_tf32"], before["matmul_tf32"]
    if before["workspace"] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = before["workspace"]


def test_off_leaves_torch_alone(restored_switches):
    torch.backends.cudnn.benchmark = True  # the caller's own choice
    use_deterministic(False)
    assert _switches() == {**restored_switches, "benchmark": True}


@pytest.mark.parametrize("preset,kept", [(None, ":4096:8"), (":16:8", ":16:8"), (":0:0", ":4096:8")])
def test_on_sets_every_switch(restored_switches, monkeypatch, preset, kept):
    if preset is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    else:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", preset)
    use_deterministic(True)
    assert _switches() == {"algorithms": True, "cudnn": True, "benchmark": False, "cudnn_tf32": False,
                           "matmul_tf32": False, "workspace": kept}


@pytest.mark.timeout(240)
def test_deterministic_pipeline_equals_deterministic_sequential(restored_switches, tmp_path):
    reference = tmp_path / "sequential"
    SequentialTrainer(_mlp(run__deterministic=True, run__out=str(reference))).run()
    assert torch.are_deterministic_algorithms_enabled()  # the sequential trainer switched this process
    out = tmp_path / "pipeline"
    assert launch(_mlp(pipeline__stages=2, pipeline__transport="dist", run__deterministic=True, run__out=str(out))) == 0
    run = _results(out)
    assert [(s["deterministic"], s["dist_backend"]) for s in run[0]["stage_stats"]] == [(True, "gloo")] * 2
    assert json.loads((reference / "summary.json").read_text())["config"]["run"]["deterministic"]
    _assert_same(run, _results(reference))


def test_the_flag_reaches_the_sequential_trainer(restored_switches, capsys):
    assert main(["train", "--dataset", "synthetic", "--synthetic-train-size", "64", "--synthetic-test-size", "32",
                 "--batch-size", "32", "--num-hidden", "16", "--no-progress", "--threads", "1", "--deterministic"]) == 0
    assert torch.are_deterministic_algorithms_enabled()
