"""The backbone: a K-stage pipeline over any transport ends bit-identical to the sequential trainer.

Block k's input at batch t depends only on blocks < k at batch t, so splitting the blocks over processes must
not change a single bit (each process uses one intra-op thread, as does the reference: CPU reductions such as
batch norm's depend on the thread count).
"""

import json

import pytest
import torch

from helpers import small_config
from launch.local import launch
from pipeline.checkpoint import load_weights
from pipeline.sequential import SequentialTrainer

TRANSPORTS = ["dist", "zmq", "local"]


def _mlp(**kw):
    # 4 blocks; 888 = 55 full batches of 16 + a last batch of 8; two epochs with an LR step between them
    return small_config(model__num_layers=3, model__num_hidden=48, data__batch_size=16, data__synthetic_train_size=888,
                        data__synthetic_test_size=100, run__epochs=2, optim__lr_decay_milestones=(1,), **kw)


def _vgg(**kw):
    return small_config(model="vgg8b", like="cifar10", model__num_layers=1, model__num_hidden=32, model__feat_mult=0.125,
                        data__batch_size=8, data__synthetic_train_size=36, data__synthetic_test_size=12, **kw)


MODELS = {"mlp": _mlp, "vgg8b": _vgg}


def _results(out):
    summary = json.loads((out / "summary.json").read_text())
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, epochs, load_weights(str(out))


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    refs = {}
    for name, make in MODELS.items():
        out = tmp_path_factory.mktemp(f"sequential-{name}")
        SequentialTrainer(make(run__out=str(out))).run()
        refs[name] = _results(out)
    return refs


def _assert_same(run, reference):
    summary, epochs, weights = run
    ref_summary, ref_epochs, ref_weights = reference
    assert summary["layer_test_errors"] == ref_summary["layer_test_errors"]
    assert summary["test_error"] == ref_summary["test_error"]
    for mine, theirs in zip(epochs, ref_epochs, strict=True):
        for key in ("layer_test_errors", "layer_train_losses", "layer_train_errors", "lr"):
            assert mine[key] == theirs[key], key
    assert sorted(weights) == sorted(ref_weights)
    for index, state in ref_weights.items():
        for name, tensor in state.items():
            assert torch.equal(weights[index][name], tensor), f"block {index} {name} differs"


# K=1 opens no channel, so it runs once (over dist); every K > 1 runs over every transport
SPLITS = [(1, "dist")] + [(stages, transport) for stages in (2, 3, 4) for transport in TRANSPORTS]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stages,transport", SPLITS, ids=[f"{t}-{k}" for k, t in SPLITS])
@pytest.mark.parametrize("model", ["mlp", "vgg8b"])
def test_pipeline_equals_sequential(references, tmp_path, model, transport, stages):
    cfg = MODELS[model](pipeline__stages=stages, pipeline__transport=transport, run__out=str(tmp_path))
    assert launch(cfg) == 0
    run = _results(tmp_path)
    assert run[0]["stages"] == stages and len(run[0]["stage_stats"]) == stages
    _assert_same(run, references[model])


def _dfa(**kw):
    return _mlp(loss="dfa", model__nonlin="tanh", **kw)


@pytest.fixture(scope="module")
def dfa_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential-dfa")
    SequentialTrainer(_dfa(run__out=str(out))).run()
    return _results(out)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_synchronous_dfa_pipeline_equals_the_dfa_trainer(dfa_reference, tmp_path, transport, stages):
    cfg = _dfa(pipeline__stages=stages, pipeline__transport=transport, pipeline__dfa_sync=True, run__out=str(tmp_path))
    assert launch(cfg) == 0
    run = _results(tmp_path)
    assert all(s["dfa_delay_max"] == 0 and s["dfa_delay_mean"] == 0 for s in run[0]["stage_stats"])
    _assert_same(run, dfa_reference)


@pytest.mark.timeout(180)
def test_alignment_logged_by_the_pipeline_equals_the_sequential_log(tmp_path_factory, tmp_path):
    common = dict(loss="dfa", model__nonlin="tanh", optim__lr=5e-3, run__log_alignment=3)  # 8 steps: 3, 6, end
    reference = tmp_path_factory.mktemp("sequential-align")
    SequentialTrainer(small_config(run__out=str(reference), **common)).run()
    assert launch(small_config(pipeline__stages=3, pipeline__transport="dist", pipeline__dfa_sync=True,
                               run__out=str(tmp_path), **common)) == 0
    logged = (tmp_path / "alignment.jsonl").read_text()
    assert logged == (reference / "alignment.jsonl").read_text() and logged.count("\n") == 3


@pytest.mark.timeout(180)
@pytest.mark.parametrize("max_delay", [None, 1])
def test_asynchronous_dfa_pipeline_learns_with_a_bounded_delay(tmp_path, max_delay):
    cfg = small_config(loss="dfa", model__nonlin="tanh", model__num_layers=3, model__num_hidden=48, data__batch_size=16,
                       data__synthetic_train_size=888, data__synthetic_test_size=100, run__epochs=2, optim__lr=5e-3,
                       pipeline__stages=3, pipeline__transport="zmq", pipeline__queue_depth=2,
                       pipeline__dfa_max_delay=max_delay, run__out=str(tmp_path))
    assert launch(cfg) == 0
    summary, epochs, _ = _results(tmp_path)
    first, *_, last = summary["stage_stats"]
    assert first["dfa_delay_max"] > 0 and last["dfa_delay_max"] == 0
    assert 0 < first["dfa_delay_mean"] <= first["dfa_delay_max"] and last["dfa_delay_mean"] == 0
    if max_delay is not None:  # unbounded, the delay also counts the error's trip back, which the scheduler sets
        assert first["dfa_delay_max"] <= max_delay
    assert summary["test_error"] < 20.0  # chance is 90%; the sequential DFA trainer reaches 1% here


@pytest.mark.timeout(180)
def test_explicit_uneven_partition_equals_sequential(references, tmp_path):
    cfg = _mlp(pipeline__stages=2, pipeline__partition=(3, 1), run__out=str(tmp_path))
    assert launch(cfg) == 0
    run = _results(tmp_path)
    assert run[0]["partition"] == [3, 1]
    _assert_same(run, references["mlp"])


@pytest.mark.timeout(180)
def test_auto_partition_runs_the_split_its_profile_picks_and_equals_sequential(references, tmp_path):
    from pipeline.partition import balanced_partition, stage_times

    cfg = _mlp(pipeline__stages=3, pipeline__partition="auto", run__out=str(tmp_path))
    assert launch(cfg) == 0
    run = _results(tmp_path)
    profile = run[0]["stage_stats"][0]["partition_profile"]  # stage 0 timed each block's step and send
    compute, send = [ms / 1e3 for ms in profile["compute_ms"]], [ms / 1e3 for ms in profile["send_ms"]]
    assert len(compute) == 4 and all(c > 0 for c in compute)
    picked = list(balanced_partition(compute, send, 3))
    assert run[0]["partition"] == profile["chosen"] == picked  # what every stage ran is what the profile picked
    assert [len(s["blocks"]) for s in run[0]["stage_stats"]] == picked
    assert max(stage_times(compute, send, picked)) <= max(stage_times(compute, send, (2, 1, 1)))  # the even split
    _assert_same(run, references["mlp"])
