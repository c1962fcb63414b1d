"""Alignment angles: zero for backprop by construction, well below 90 degrees once DFA has trained, reports written."""

import json

import pytest
import torch

from helpers import small_config
from pipeline.observe.align import run_align, table
from pipeline.observe.alignment import alignment_angles, angle_degrees, backprop_gradients, rule_gradients
from pipeline.cli import main
from pipeline.model.factories import build_blocks
from pipeline.sequential import SequentialTrainer


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)


def test_angle_between_vectors():
    assert angle_degrees(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == pytest.approx(90.0)
    assert angle_degrees(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0])) == pytest.approx(0.0, abs=1e-4)
    assert angle_degrees(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])) == pytest.approx(180.0)
    assert angle_degrees(torch.zeros(2), torch.tensor([1.0, 0.0])) == 90.0


def test_backprop_is_aligned_with_itself():
    blocks = build_blocks(small_config(loss="backprop"), (1, 28, 28), 10)
    assert alignment_angles(blocks, *_batch(), "backprop") == pytest.approx([0.0, 0.0], abs=1e-3)


def test_fa_gradient_differs_from_backprop_only_below_the_top_layer():
    blocks = build_blocks(small_config(loss="fa", model__dropout=0.0), (1, 28, 28), 10)
    x, y = _batch()
    fa, bp = rule_gradients(blocks, x, y, "fa"), backprop_gradients(blocks, x, y)
    assert not torch.allclose(fa[-1], bp[-1])  # the error reached the last hidden layer through B, not W^T
    assert angle_degrees(fa[0], bp[0]) > 30


def test_measuring_leaves_the_network_untouched():
    blocks = build_blocks(small_config(loss="dfa"), (1, 28, 28), 10)
    before = [{k: v.clone() for k, v in b.state_dict().items()} for b in blocks]
    alignment_angles(blocks, *_batch(), "dfa")
    for block, state in zip(blocks, before):
        assert all(torch.equal(v, state[k]) for k, v in block.state_dict().items())
        assert all(p.grad is None for p in block.parameters())


def test_dfa_aligns_with_backprop_as_it_trains(tmp_path):
    cfg = small_config(loss="dfa", model__nonlin="tanh", model__num_hidden=64, optim__lr=5e-3, run__epochs=2,
                       data__synthetic_train_size=1024, run__out=str(tmp_path))
    x, y = _batch(1)
    untrained = alignment_angles(SequentialTrainer(cfg).blocks, x, y, "dfa")
    records = run_align(cfg, every=16, load=None)
    assert all(a > 75 for a in untrained), untrained
    final = records[-1]
    assert final["epoch_end"] and all(a < 75 for a in final["angles"]), final  # clearly below a random 90
    assert len(json.loads((tmp_path / "alignment.json").read_text())) == len(records)
    assert (tmp_path / "alignment.csv").read_text().count("\n") == 1 + 2 * len(records)
    assert (tmp_path / "alignment.png").stat().st_size > 1000
    assert "| 0 |" in table(records) and "epoch 2" in table(records)


def test_align_measures_a_finished_run(tmp_path, capsys):
    run, report = tmp_path / "run", tmp_path / "report"
    SequentialTrainer(small_config(loss="backprop", run__out=str(run))).run()
    assert main(["align", "--load", str(run), "--out", str(report), "--no-progress"]) == 0
    assert "rule backprop" in capsys.readouterr().out
    record = json.loads((report / "alignment.json").read_text())[0]
    assert record["angles"] == pytest.approx([0.0, 0.0], abs=1e-3)


def test_align_refuses_a_missing_run(tmp_path, capsys):
    assert main(["align", "--load", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")]) == 2
    assert "no readable summary.json" in capsys.readouterr().err
