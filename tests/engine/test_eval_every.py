"""--eval-every N: a test pass every N training batches (tests.jsonl), the same in one process and in a pipeline,
and training unchanged by it."""

import json

import pytest
import torch

from helpers import small_config
from pipeline.run.launcher import launch
from pipeline.persistence.checkpoint import load_weights
from pipeline.data import BatchSource
from pipeline.transport.message import Kind
from pipeline.engine.message_stream import data_messages
from pipeline.sequential import SequentialTrainer


def _mlp(**kw):
    # 4 blocks, 10 batches of 16 per epoch (the last one of 12), 2 epochs
    return small_config(model__num_layers=3, model__num_hidden=32, data__batch_size=16, data__synthetic_train_size=156,
                        data__synthetic_test_size=40, run__epochs=2, **kw)


def _tests(out):
    return [json.loads(line) for line in (out / "tests.jsonl").read_text().splitlines()]


def test_the_stream_tests_every_n_steps_and_once_at_each_epoch_end():
    cfg = _mlp(run__eval_every=4)
    source = BatchSource(cfg.data, cfg.run.seed)
    passes, step = [], 0
    for msg in data_messages(source, cfg):
        step += msg.kind == Kind.TRAIN
        if msg.kind == Kind.EVAL and msg.meta.get("last"):
            passes.append((msg.epoch, msg.meta["step"], msg.meta["interim"], step))
    # steps 4 and 8 in epoch 1, 12 16 in epoch 2 (step 20 is epoch 2's last batch: its epoch test, not a second one)
    assert passes == [(1, 4, True, 4), (1, 8, True, 8), (1, 10, False, 10),
                      (2, 12, True, 12), (2, 16, True, 16), (2, 20, False, 20)]


def test_the_sequential_trainer_records_each_test_and_trains_as_without_them(tmp_path):
    with_tests, without = tmp_path / "with", tmp_path / "without"
    SequentialTrainer(_mlp(run__eval_every=4, run__out=str(with_tests))).run()
    SequentialTrainer(_mlp(run__out=str(without))).run()
    tests = _tests(with_tests)
    assert [(t["epoch"], t["step"]) for t in tests] == [(1, 4), (1, 8), (1, 10), (2, 12), (2, 16), (2, 20)]
    epochs = [json.loads(line) for line in (with_tests / "metrics.jsonl").read_text().splitlines()]
    assert [t["layer_test_errors"] for t in tests if t["step"] in (10, 20)] == [e["layer_test_errors"] for e in epochs]
    assert [t["test_s"] for t in tests] == sorted(t["test_s"] for t in tests)  # accumulated
    assert all(0 < t["test_s"] < t["wall_s"] for t in tests)
    untimed = [{k: v for k, v in t.items() if k not in ("wall_s", "test_s")} for t in tests if t["step"] in (10, 20)]
    assert untimed == [{k: v for k, v in t.items() if k not in ("wall_s", "test_s")} for t in _tests(without)]
    a, b = load_weights(str(with_tests)), load_weights(str(without))
    assert all(torch.equal(a[i][k], b[i][k]) for i in b for k in b[i])  # testing changed no weight


@pytest.mark.timeout(120)
def test_a_pipeline_with_heads_first_tests_as_the_sequential_trainer(tmp_path):
    """Heads first: stage 0 holds block 1's heads, stage 1 its layer; every interim test reads the heads' weights
    across the link, as the epoch's test does."""
    reference, piped = tmp_path / "sequential", tmp_path / "pipeline"
    SequentialTrainer(_mlp(run__eval_every=3, run__out=str(reference))).run()
    cfg = _mlp(run__eval_every=3, run__out=str(piped), pipeline__stages=2, pipeline__partition=["1.5h", 2.5],
               pipeline__transport="local")
    assert launch(cfg) == 0
    mine, theirs = _tests(piped), _tests(reference)
    assert len(mine) == 8  # 3, 6, 9, 10 per epoch
    assert [(t["epoch"], t["step"], t["layer_test_errors"]) for t in mine] == \
        [(t["epoch"], t["step"], t["layer_test_errors"]) for t in theirs]
    assert all(0 < t["test_s"] < t["wall_s"] for t in mine)


def test_a_resumed_run_keeps_the_tests_before_its_checkpoint_and_writes_the_rest_once(tmp_path):
    from pipeline.observe.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path))
    for epoch, step, interim in ((1, 5, True), (1, 10, False), (2, 15, True), (2, 20, False)):
        writer.test({"epoch": epoch, "step": step, "interim": interim})
    # a checkpoint after epoch 2's last batch (step 20) comes before epoch 2's own test, which the resumed run
    # runs again: that line goes, the interim ones up to step 20 stay
    MetricsWriter(str(tmp_path), resumed_epoch=2, resumed_step=20)
    assert [(t["epoch"], t["step"]) for t in _tests(tmp_path)] == [(1, 5), (1, 10), (2, 15)]
    MetricsWriter(str(tmp_path), resumed_epoch=1, resumed_step=7)  # within epoch 1, after step 5
    assert [(t["epoch"], t["step"]) for t in _tests(tmp_path)] == [(1, 5)]


def test_interim_tests_are_left_out_of_the_samples_per_second(monkeypatch):
    from pipeline.observe import metrics

    clock = iter([0.0, 1.0, 2.0, 13.0, 14.0])  # a 10 s test between the 2nd and 3rd timed batches
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    throughput = metrics.Throughput(warmup=1)
    throughput.start_epoch()
    for i in range(5):
        throughput.batch_done(100)
        if i == 2:
            throughput.exclude(10.0)
    assert throughput.epoch_rate() == 400 / (14.0 - 0.0 - 10.0)
