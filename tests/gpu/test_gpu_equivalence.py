"""On one GPU, every stage count and transport ends bit-identical to the sequential trainer under --deterministic.

All stages share cuda:0 (the one-GPU emulation), so `dist` runs over gloo; the last two tests need two GPUs and
run `dist` over NCCL. The configs and comparisons are tests/test_equivalence.py's, moved to the GPU.
"""

import pytest
import torch

from pipeline.run.launcher import launch
from test_equivalence import TRANSPORTS, _assert_same, _dfa, _mlp, _results, _vgg

pytestmark = pytest.mark.cuda
STALL_S = 60.0  # a stalled stage fails its run in a minute, well inside each test's timeout


def _gpu(make):
    """make() on the GPU, deterministic, with a short stall timeout (a deadlock fails fast, not at the test timeout)."""
    return lambda **kw: make(run__device="cuda", run__deterministic=True, pipeline__stall_timeout=STALL_S, **kw)


CONFIGS = {"mlp": _gpu(_mlp), "vgg8b": _gpu(_vgg), "dfa": _gpu(_dfa)}
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs two GPUs (NCCL between them)")


def _launch(cfg, out):
    assert launch(cfg) == 0
    run = _results(out)
    assert run[0]["stages"] == cfg.pipeline.stages
    return run


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("model", ["mlp", "vgg8b"])
def test_one_gpu_pipeline_equals_sequential(sequential_reference, one_gpu, tmp_path, model, transport, stages):
    cfg = CONFIGS[model](pipeline__stages=stages, pipeline__transport=transport, run__out=str(tmp_path))
    run = _launch(cfg, tmp_path)
    assert [s["device"] for s in run[0]["stage_stats"]] == ["cuda:0"] * stages
    if transport == "dist":  # stages sharing a GPU cannot use NCCL between them
        assert [s.get("dist_backend") for s in run[0]["stage_stats"]] == ["gloo"] * stages
    _assert_same(run, sequential_reference(model, CONFIGS[model]))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_one_gpu_synchronous_dfa_equals_the_dfa_trainer(sequential_reference, one_gpu, tmp_path, transport, stages):
    cfg = CONFIGS["dfa"](pipeline__stages=stages, pipeline__transport=transport, pipeline__dfa_sync=True,
                         run__out=str(tmp_path))
    run = _launch(cfg, tmp_path)
    assert all(s["dfa_delay_max"] == 0 for s in run[0]["stage_stats"])
    _assert_same(run, sequential_reference("dfa", CONFIGS["dfa"]))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sizes", [(1.5, 2.5), (1.5, 1, 1.5), ("1.5h", 2.5)], ids=["1.5,2.5", "1.5,1,1.5", "1.5h,2.5"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_one_gpu_split_heads_equal_sequential(sequential_reference, one_gpu, tmp_path, transport, sizes):
    # h goes on and dL/dh comes back across helper threads' streams (pipeline/engine/remote_heads.py); heads first: h comes
    # back, dL/dh goes on, and the heads' weights go on before a test (pipeline/engine/upstream_heads.py)
    cfg = CONFIGS["mlp"](pipeline__stages=len(sizes), pipeline__partition=sizes, pipeline__transport=transport,
                         run__out=str(tmp_path))
    run = _launch(cfg, tmp_path)
    assert run[0]["partition"] == list(sizes)
    _assert_same(run, sequential_reference("mlp", CONFIGS["mlp"]))


def _async_dfa(stages, **kw):
    # test_equivalence's asynchronous DFA run, on the GPU and not deterministic (the default a user runs)
    return _mlp(loss="dfa", model__nonlin="tanh", optim__lr=5e-3, pipeline__stages=stages, pipeline__queue_depth=2,
                run__device="cuda", pipeline__stall_timeout=STALL_S, **kw)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_one_gpu_asynchronous_dfa_completes_and_learns(one_gpu, tmp_path, transport):
    # the errors flow backwards while activations flow forwards: this once deadlocked over NCCL's semantics
    summary, _, _ = _launch(_async_dfa(3, pipeline__transport=transport, run__out=str(tmp_path)), tmp_path)
    assert summary["stage_stats"][0]["dfa_delay_max"] > 0
    assert summary["test_error"] < 20.0  # chance is 90%; the sequential DFA trainer reaches about 1% here


@two_gpus
@pytest.mark.timeout(120)
def test_two_gpus_over_nccl_equal_sequential(sequential_reference, tmp_path):
    cfg = CONFIGS["mlp"](pipeline__stages=2, pipeline__transport="dist", run__out=str(tmp_path))
    run = _launch(cfg, tmp_path)
    assert [s["device"] for s in run[0]["stage_stats"]] == ["cuda:0", "cuda:1"]
    assert [s.get("dist_backend") for s in run[0]["stage_stats"]] == ["nccl", "nccl"]
    _assert_same(run, sequential_reference("mlp", CONFIGS["mlp"]))


@two_gpus
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sizes", [(1.5, 2.5), ("1.5h", 2.5)], ids=["1.5,2.5", "1.5h,2.5"])
def test_two_gpus_split_heads_over_nccl_equal_sequential(sequential_reference, tmp_path, sizes):
    cfg = CONFIGS["mlp"](pipeline__stages=2, pipeline__partition=sizes, pipeline__transport="dist", run__out=str(tmp_path))
    run = _launch(cfg, tmp_path)
    assert [s.get("dist_backend") for s in run[0]["stage_stats"]] == ["nccl", "nccl"]
    _assert_same(run, sequential_reference("mlp", CONFIGS["mlp"]))


@two_gpus
@pytest.mark.timeout(120)
def test_two_gpus_asynchronous_dfa_over_nccl_completes_and_learns(tmp_path):
    cfg = _async_dfa(2, pipeline__transport="dist", run__out=str(tmp_path))
    summary, _, _ = _launch(cfg, tmp_path)
    assert [s.get("dist_backend") for s in summary["stage_stats"]] == ["nccl", "nccl"]
    assert summary["test_error"] < 20.0
