"""The deferred non-finite guard: a bad update never reaches the weights, and the run names the first bad batch."""

import pytest
import torch

from helpers import small_config
from pipeline.cli import build_parser, config_from_args
from pipeline.run.faults import FAULT_ENV, Hooks
from pipeline.run.in_process import StageFailed, run_in_process
from pipeline.block.nonfinite import NonFiniteLoss, NonFiniteWatch
from pipeline.sequential import SequentialTrainer

BAD_BATCH, EVERY = 5, 8


def _trainer(**kw):
    # 16 batches of 32; the flags are read every 8 batches, as on a GPU (the CPU default reads them every batch)
    trainer = SequentialTrainer(small_config(data__synthetic_train_size=512, model__dropout=0.0, **kw))
    trainer.watch = NonFiniteWatch(every=EVERY).attach(trainer.blocks)
    return trainer


def _at_bad_batch(trainer, block, poisoned, otherwise):
    """Replace block.learn: `poisoned(h, y)` at BAD_BATCH of epoch 1, `otherwise(h, y)` elsewhere."""
    def learn(h, y):
        at = (trainer.watch.epoch, trainer.watch.batch) == (1, BAD_BATCH)
        return (poisoned if at else otherwise)(h, y)
    block.learn = learn


def _poison_loss(block, make_bad):
    """block.learn on a loss made non-finite by make_bad(loss)."""
    real = block.heads.loss

    def learn(h, y):
        block.heads.loss = lambda h, y: (make_bad(real(h, y)[0]), None)
        try:
            return type(block).learn(block, h, y)
        finally:
            del block.heads.loss
    return learn


def _states(trainer):
    return [(b.state_dict(), b.optimizer.state_dict()["state"]) for b in trainer.blocks]


def _assert_same_states(a, b):
    for index, ((weights, optim), (ref_weights, ref_optim)) in enumerate(zip(a, b)):
        for name, value in weights.items():
            assert torch.equal(value, ref_weights[name]), (index, name)
        assert optim.keys() == ref_optim.keys()
        for key, state in optim.items():
            assert all(torch.equal(v, ref_optim[key][k]) for k, v in state.items()), (index, key)


def test_a_nan_at_batch_5_stops_the_run_within_8_batches_naming_batch_5():
    trainer = _trainer()
    block = trainer.blocks[1]
    # NaN times the loss: NaN gradients too, which would reach the weights if the step were not skipped
    _at_bad_batch(trainer, block, _poison_loss(block, lambda loss: loss * float("nan")), block.learn)
    with pytest.raises(NonFiniteLoss) as raised:
        trainer.run()
    assert str(raised.value) == ("epoch 1 batch 5, block 1: loss is not finite (use --skip-nonfinite to skip such updates)")
    assert trainer.position == {"epoch": 1, "batch": EVERY, "step": EVERY}  # read at the start of batch 8, not before
    for b in trainer.blocks:
        assert all(torch.isfinite(p).all() for p in b.parameters()), b.index
    assert block.optimizer.state[block.layer.weight]["step"] == EVERY - 1  # the bad step was rolled back


def test_skipping_a_nan_at_batch_5_equals_a_run_without_that_update():
    skipping = _trainer(run__skip_nonfinite=True, run__epochs=2)
    reference = _trainer(run__epochs=2)
    for trainer, poisoned in ((skipping, None), (reference, lambda h, y: None)):  # the reference makes no update at all
        block = trainer.blocks[1]
        # NaN plus the loss: its gradients stay finite, so only the device-side skip keeps the update out
        _at_bad_batch(trainer, block, poisoned or _poison_loss(block, lambda loss: loss + float("nan")), block.learn)
    summary, ref_summary = skipping.run(), reference.run()
    assert summary["skipped_updates"] == {1: 1} and ref_summary["skipped_updates"] == {}
    assert summary["layer_test_errors"] == ref_summary["layer_test_errors"]
    _assert_same_states(_states(skipping), _states(reference))


def test_skipped_updates_leave_the_epoch_statistics_exactly():
    skipping, reference = _trainer(run__skip_nonfinite=True), _trainer()
    for trainer, poisoned in ((skipping, None), (reference, lambda h, y: None)):
        block = trainer.blocks[0]
        _at_bad_batch(trainer, block, poisoned or _poison_loss(block, lambda loss: loss + float("inf")), block.learn)
        trainer.train_epoch(1)
    assert skipping.blocks[0].stats.examples == reference.blocks[0].stats.examples == 512 - 32
    assert [b.stats.summary() for b in skipping.blocks] == [b.stats.summary() for b in reference.blocks]


def test_a_dfa_error_that_is_not_finite_is_named_as_such():
    trainer = _trainer(loss="dfa")
    output = trainer.blocks[-1]
    # the output's loss is fine, its error to the hidden blocks is not
    real = output.forward_train

    def forward_train(x):
        logits, _ = real(x)
        if trainer.watch.batch == BAD_BATCH:
            logits = logits + torch.where(torch.arange(logits.shape[1]) == 0, float("nan"), 0.0).detach()
        return logits, logits
    output.forward_train = forward_train
    output.learn = lambda logits, y: torch.tensor(False)  # only the DFA blocks see the NaN
    with pytest.raises(NonFiniteLoss, match=r"^epoch 1 batch 5, block 0: the output error is not finite"):
        trainer.run()


def test_the_watch_reads_pending_flags_before_a_checkpoint(tmp_path):
    trainer = _trainer(run__checkpoint_dir=str(tmp_path / "ckpt"), run__checkpoint_every=6)
    block = trainer.blocks[0]
    _at_bad_batch(trainer, block, _poison_loss(block, lambda loss: loss * float("nan")), block.learn)
    with pytest.raises(NonFiniteLoss, match=r"^epoch 1 batch 5, block 0: loss is not finite"):
        trainer.run()
    assert trainer.position["batch"] == 6  # stopped at the checkpoint after batch 5, before writing it
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_a_late_update_is_named_by_its_own_batch():
    # asynchronous DFA applies batch 3's error while batch 5 is under way
    trainer = _trainer()
    watch = trainer.watch
    watch.begin(1, 5)
    with watch.at(1, 3):
        trainer.blocks[0].report(torch.tensor(True), 32)
    assert (watch.epoch, watch.batch) == (1, 5)
    with pytest.raises(NonFiniteLoss, match=r"^epoch 1 batch 3, block 0: loss is not finite"):
        watch.check()


# A non-finite loss inside a pipeline stage, skipped (tests/engine/test_stage.py has one that stops the run). The stages
# run as threads (pipeline/run/in_process.py); the fault is the hook PIPELINE_FAIL_AT=STAGE:BATCH:nan asks for, which
# poisons the loss of that stage's first block at that batch (pipeline/run/faults.py).
PIPELINE_RUN = ["--dataset", "synthetic", "--num-layers", "2", "--num-hidden", "32", "--batch-size", "32",
                "--synthetic-train-size", "640", "--synthetic-test-size", "64", "--epochs", "1", "--threads", "1",
                "--no-progress", "--lr", "1e-3", "--seed", "3"]


def _train(args, fault, out):
    """The run these command-line options describe (the CLI's defaults), with the fault injected."""
    cfg = config_from_args(build_parser().parse_args(["train", *PIPELINE_RUN, *args, "--out", str(out)]))
    hooks = Hooks.from_env({FAULT_ENV: fault})
    return SequentialTrainer(cfg, hooks=hooks).run() if cfg.pipeline.stages == 1 else run_in_process(cfg, hooks)


@pytest.mark.timeout(240)
def test_a_pipeline_skips_a_nan_update_exactly_as_the_sequential_trainer_does(tmp_path):
    import json

    from pipeline.persistence.checkpoint import load_weights

    runs = {}
    for name, args, fault in (("sequential", [], "0:7:nan"), ("pipeline", ["--stages", "3", "--transport", "zmq"], "0:7:nan"),
                              # block 0's layer alone on stage 0, its heads first on stage 1: the flag goes back with dL/dh
                              ("split heads", ["--stages", "2", "--transport", "dist", "--partition", "0.5,2.5"], "1:7:nan")):
        _train(args + ["--skip-nonfinite"], fault, tmp_path / name)  # block 0's update at batch 7
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text()), load_weights(str(tmp_path / name))
    sequential, ref_weights = runs["sequential"]
    assert sequential["skipped_updates"] == {"0": 1}
    assert [s["skipped_updates"] for s in runs["pipeline"][0]["stage_stats"]] == [{"0": 1}, {}, {}]
    assert [s["skipped_updates"] for s in runs["split heads"][0]["stage_stats"]] == [{}, {"0": 1}]
    for name in ("pipeline", "split heads"):
        summary, weights = runs[name]
        assert summary["layer_test_errors"] == sequential["layer_test_errors"], name
        assert all(torch.equal(weights[i][k], ref_weights[i][k]) for i in ref_weights for k in ref_weights[i]), name


@pytest.mark.timeout(240)
def test_heads_first_skip_a_nan_update_on_both_halves_as_the_sequential_trainer_does(tmp_path):
    """Block 0's heads alone on stage 0, its layer on stage 1 (0.5h,2.5): the heads learn from batch t's h while
    stage 0 trains batch t+1, so a NaN injected at stage 0's batch 7 poisons batch 6's heads update; the flag goes
    on with dL/dh and the layer skips that update too, as the sequential trainer skips a NaN at batch 6."""
    import json

    from pipeline.persistence.checkpoint import load_weights

    runs = {}
    for name, args, fault in (("sequential", [], "0:6:nan"),
                              ("heads first", ["--stages", "2", "--transport", "zmq", "--partition", "0.5h,2.5"], "0:7:nan")):
        _train(args + ["--skip-nonfinite"], fault, tmp_path / name)
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text()), load_weights(str(tmp_path / name))
    (sequential, ref_weights), (summary, weights) = runs["sequential"], runs["heads first"]
    assert sequential["skipped_updates"] == {"0": 1}
    assert [s["skipped_updates"] for s in summary["stage_stats"]] == [{"0": 1}, {}]  # counted where the loss is
    assert summary["layer_test_errors"] == sequential["layer_test_errors"]
    assert all(torch.equal(weights[i][k], ref_weights[i][k]) for i in ref_weights for k in ref_weights[i])


# Stop mode (no --skip-nonfinite) on a split block: the stage whose loss went bad stops the run, naming itself, the
# batch the update belongs to and the block; the other half follows the flag that came with dL/dh.
@pytest.mark.timeout(60)
@pytest.mark.parametrize("partition,stage,batch", [
    ((0.5, 2.5), 1, 7),  # block 0's heads on stage 1: their loss at batch 7
    (("0.5h", 2.5), 0, 6)],  # block 0's heads first on stage 0: its step of batch 7 learns from h of batch 6
    ids=["split-heads", "heads-first"])
def test_a_nan_on_a_split_block_stops_the_run_naming_stage_batch_and_block(partition, stage, batch):
    cfg = small_config(model__num_layers=2, data__synthetic_train_size=640, pipeline__stages=2,
                       pipeline__partition=partition)
    with pytest.raises(StageFailed) as raised:
        run_in_process(cfg, Hooks(fail_stage=stage, fail_batch=7, fail_mode="nan"))
    named = [str(exc) for _, exc in raised.value.failures if isinstance(exc, NonFiniteLoss)]
    assert named and named[0] == (f"stage {stage}, epoch 1 batch {batch}, block 0: loss is not finite "
                                  f"(use --skip-nonfinite to skip such updates)"), named
