"""The sequential trainer: learns, is deterministic, writes its outputs, and supports every learning rule."""

import json

import pytest
import torch

from helpers import small_config
from pipeline.persistence.checkpoint import load_weights
from pipeline.sequential import SequentialTrainer


def _weights(trainer):
    return {b.index: {k: v.clone() for k, v in b.state_dict().items()} for b in trainer.blocks}


def test_same_seed_gives_bit_identical_training():
    a, b = SequentialTrainer(small_config()), SequentialTrainer(small_config())
    sa, sb = a.run(), b.run()
    assert sa["layer_test_errors"] == sb["layer_test_errors"]
    for (ia, wa), (ib, wb) in zip(_weights(a).items(), _weights(b).items()):
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("loss,bio,epochs", [("predsim", False, 3), ("pred", False, 3), ("sim", False, 3), ("predsim", True, 3),
                                             ("backprop", False, 3), ("fa", False, 6), ("dfa", False, 3)])
def test_every_learning_rule_learns_the_synthetic_task(loss, bio, epochs, tmp_path):
    # fa first has to align its forward weights with the random feedback: it gets more epochs
    cfg = small_config(loss=loss, loss__bio=bio, run__epochs=epochs, data__synthetic_train_size=512, optim__lr=5e-3,
                       run__out=str(tmp_path))
    summary = SequentialTrainer(cfg).run()
    assert summary["test_error"] < 50.0, summary  # chance is 90%
    hidden = summary["layer_test_errors"][:-1]
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    if loss in ("backprop", "fa", "dfa"):
        assert hidden == [None, None]  # no local heads at all
        return
    # every hidden block's own local loss goes down: the block itself learns, not only the output layer
    first, last = epochs[0]["layer_train_losses"][:-1], epochs[-1]["layer_train_losses"][:-1]
    assert all(b < a for a, b in zip(first, last)), (first, last)
    if loss == "sim":
        assert hidden == [None, None]  # no local classifier to score
    else:
        assert all(e is not None and e < 60.0 for e in hidden)


def test_backprop_updates_every_block_through_the_output_loss():
    trainer = SequentialTrainer(small_config(loss="backprop"))
    before = _weights(trainer)
    batch = next(trainer.source.train_batches(1))
    trainer.train_batch(batch.x, batch.y)
    after = _weights(trainer)
    assert all(not torch.equal(before[i]["layer.weight"], after[i]["layer.weight"]) for i in before)


def test_run_writes_summary_metrics_and_weights(tmp_path):
    cfg = small_config(run__epochs=2, run__out=str(tmp_path), optim__lr_decay_milestones=(1,), optim__lr_decay_fact=0.1)
    trainer = SequentialTrainer(cfg)
    summary = trainer.run()
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["test_error"] == summary["test_error"] == summary["layer_test_errors"][-1]
    assert on_disk["config"]["model"]["name"] == "mlp" and on_disk["train_samples_per_s"] > 0 and on_disk["wall_s"] > 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert [r["lr"] for r in lines] == [pytest.approx(1e-3), pytest.approx(1e-4)]
    assert trainer.blocks[0].optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    saved = load_weights(str(tmp_path))
    assert sorted(saved) == [0, 1, 2]
    assert torch.equal(saved[1]["layer.weight"], trainer.blocks[1].layer.weight)


def test_mnist_mlp_learns_in_a_hundred_batches(mnist_root):
    cfg = small_config(data__dataset="mnist", data__data_dir=mnist_root, data__batch_size=128, data__limit_train_batches=100,
                       data__limit_eval_batches=20, model__num_hidden=256, optim__lr=2e-3, run__threads=None)
    summary = SequentialTrainer(cfg).run()
    assert summary["test_error"] < 12.0, summary["layer_test_errors"]


def test_backprop_step_is_plain_pytorch_backprop():
    import copy

    import torch.nn.functional as F

    # no batch norm: under it a layer's bias has a zero gradient (rounding noise), which Adam blows up into
    # +-lr steps that differ between any two implementations
    trainer = SequentialTrainer(small_config(loss="backprop", model__dropout=0.0, model__batch_norm=False))
    reference = copy.deepcopy(trainer.blocks)
    optimizer = torch.optim.Adam([p for block in reference for p in block.parameters()], lr=trainer.cfg.optim.lr)
    for batch in list(trainer.source.train_batches(1))[:3]:
        x = batch.x
        for block in reference:
            x = block(x)
        optimizer.zero_grad()
        F.cross_entropy(x, batch.y).backward()
        optimizer.step()
        trainer.train_batch(batch.x, batch.y)
    for mine, theirs in zip(trainer.blocks, reference):
        for (name, p), q in zip(mine.named_parameters(), theirs.parameters()):
            assert torch.allclose(p, q, atol=1e-6), name  # fused vs for-loop Adam: same math, rounding apart
