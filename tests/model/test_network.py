"""Users' networks: a residual CNN with a custom head, defined outside the package, trains as K stages exactly as in
one process; the built-in ResNets too; a network that cannot work is refused before anything starts."""

import json
import os
import sys

import pytest
import torch

import pipeline as lp
from helpers import run_group, run_pipeline, small_config
from pipeline.persistence.checkpoint import load_weights
from pipeline.cli import main

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
RESIDUAL = os.path.join(HERE, "networks", "residual.py") + ":build"
BAD = os.path.join(HERE, "networks", "bad.py")


def _residual(**kw):
    settings = dict(data__synthetic_train_size=160, data__synthetic_test_size=48, data__batch_size=16, run__epochs=2,
                    optim__lr_decay_milestones=(1,))
    return small_config(model=RESIDUAL, **{**settings, **kw})


def _results(out):
    summary = json.loads((out / "summary.json").read_text())
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, epochs, load_weights(str(out))


def _assert_same(run, reference):
    (summary, epochs, weights), (ref_summary, ref_epochs, ref_weights) = run, reference
    assert summary["layer_test_errors"] == ref_summary["layer_test_errors"]
    for mine, theirs in zip(epochs, ref_epochs, strict=True):
        for key in ("layer_test_errors", "layer_train_losses", "layer_train_errors"):
            assert mine[key] == theirs[key], key
    assert sorted(weights) == sorted(ref_weights)
    for index, state in ref_weights.items():
        assert sorted(state) == sorted(weights[index])
        for name, tensor in state.items():
            assert torch.equal(weights[index][name], tensor), f"block {index} {name} differs"


@pytest.fixture(scope="module")
def residual_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("residual-sequential")
    summary = lp.train(_residual(run__out=str(out)))
    assert summary["mode"] == "sequential"
    return _results(out)


def test_the_users_head_and_the_built_in_rules_report_their_layers(residual_reference):
    summary, epochs, weights = residual_reference
    errors = summary["layer_test_errors"]
    # block 0: the custom head (it classifies); 1: PredSim; 2: the run's --loss (predsim); 3: the output
    assert len(errors) == 4 and all(e is not None and 0 <= e <= 100 for e in errors)
    assert "heads.classifier.weight" in weights[0] and "heads.sim_map.weight" in weights[1]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stages,transport", [(2, "threads"), (3, "threads"), (4, "threads"), (3, "dist")])
def test_a_users_network_as_k_stages_equals_one_process(residual_reference, tmp_path, stages, transport):
    summary = run_pipeline(_residual(pipeline__stages=stages, run__out=str(tmp_path)), transport)
    assert summary["stages"] == stages and summary["mode"] == "pipeline"
    _assert_same(_results(tmp_path), residual_reference)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sizes,transport", [((1.5, 2.5), "threads"), ((0.5, 1.5, 2), "threads"), (("0.5h", 3.5), "threads"),
                                             ((1.5, 2.5), "zmq")])
def test_a_users_network_with_split_heads_equals_one_process(residual_reference, tmp_path, sizes, transport):
    """Block 1 (PredSim, dropout in `after`) or block 0 (the user's own head) split from its layer."""
    summary = run_pipeline(_residual(pipeline__stages=len(sizes), pipeline__partition=sizes, run__out=str(tmp_path)),
                           transport)
    assert summary["partition"] == list(sizes)
    _assert_same(_results(tmp_path), residual_reference)


@pytest.mark.timeout(120)
def test_heads_that_draw_random_numbers_are_kept_on_their_layers_stage(tmp_path):
    base = [sys.executable, "-m", "pipeline", "train", *SMALL, "--model", f"{BAD}:noisy_heads", "--threads", "1"]
    assert run_group(base, timeout=100).returncode == 0  # in one process it trains
    proc = run_group(base + ["--stages", "2", "--partition", "0.5,2.5"], timeout=100)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == ["error: --partition 0.5,2.5 puts block 0's heads on another stage than its "
                                        "layer, but its heads draw random numbers from the block's generator, which its "
                                        "layer's stage draws from too (keep them on their layer's stage)"]


@pytest.mark.timeout(240)
def test_a_users_network_under_torchrun_equals_the_local_launcher(residual_reference, tmp_path):
    args = ["--model", RESIDUAL, "--dataset", "synthetic", "--synthetic-train-size", "160", "--synthetic-test-size",
            "48", "--batch-size", "16", "--epochs", "2", "--lr-decay-milestones", "1", "--num-layers", "2",
            "--num-hidden", "32", "--dropout", "0.1", "--nonlin", "leakyrelu", "--lr", "1e-3", "--seed", "3",
            "--threads", "1", "--no-progress", "--transport", "zmq", "--out", str(tmp_path)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3"]
    proc = run_group(torchrun + ["-m", "pipeline", "train", *args], timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same(_results(tmp_path), residual_reference)


@pytest.fixture(scope="module")
def resnet_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("resnet18-sequential")
    lp.train(_resnet(run__out=str(out)))
    return _results(out)


def _resnet(**kw):
    return small_config(model="resnet18", like="cifar10", model__feat_mult=0.0625, model__dropout=0.1,
                        data__synthetic_train_size=40, data__synthetic_test_size=16, data__batch_size=8, **kw)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stages,transport", [(1, "dist"), (2, "threads"), (3, "threads"), (4, "threads"), (4, "local")])
def test_resnet18_as_k_stages_equals_one_process(resnet_reference, tmp_path, stages, transport):
    summary = run_pipeline(_resnet(pipeline__stages=stages, run__out=str(tmp_path)), transport)
    assert len(summary["layer_test_errors"]) == 10
    _assert_same(_results(tmp_path), resnet_reference)


def test_a_factory_passed_as_a_function_is_found_by_every_stage(tmp_path):
    from networks.residual import build

    summary = lp.train(_residual(run__epochs=1, pipeline__stages=2, pipeline__transport="zmq"), build)
    assert summary["config"]["model"]["name"] == "networks.residual:build" and summary["stages"] == 2


SMALL = ["--dataset", "synthetic", "--synthetic-train-size", "64", "--synthetic-test-size", "32", "--batch-size", "32",
         "--no-progress"]

BAD_NETWORKS = [
    (f"{BAD}:mismatch", "block 1 cannot take block 0's output, shape (16, 28, 28) per example"),
    (f"{BAD}:tuple_output", "block 0: its layer returned a tuple, not a tensor"),
    (f"{BAD}:nothing_to_train", "block 1 has nothing to train"),
    (f"{BAD}:wrong_logits", "it must give 10 logits, one per class"),
    (f"{BAD}:not_a_network", "the factory returned a dict, not a Network"),
    (f"{BAD}:no_output", "must be its output classifier (OutputSpec)"),
    (f"{BAD}:failing", "the factory failed (KeyError: 'num_blocks')"),
    (f"{BAD}:bad_head", "block 0's head: a local head must return a scalar loss"),
    (f"{BAD}:bad_optim", "block 0: unknown optimizer settings learning_rate (choose from"),
    (f"{BAD}:mixed_rules", "block 1 is trained by DFA, which needs --loss dfa"),
    (f"{BAD}:heads_under_backprop", "--loss backprop trains every block from the output's loss, but block 0 has local heads"),
    (f"{BAD}:absent", "has no function 'absent'"),
    ("tests/networks/nowhere.py:build", "no file tests/networks/nowhere.py"),
    ("no_such_package.nets:build", "no_such_package.nets does not import (ModuleNotFoundError"),
    ("resnet5", "unknown --model 'resnet5'"),
]


@pytest.mark.parametrize("model,message", BAD_NETWORKS, ids=[m.rsplit(":", 1)[-1] for m, _ in BAD_NETWORKS])
def test_a_bad_network_exits_2_with_one_line_naming_the_problem(model, message, capsys):
    loss = ["--loss", "backprop"] if model.endswith(":heads_under_backprop") else []
    assert main(["train", *SMALL, *loss, "--model", model]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_a_factory_file_that_does_not_import_exits_2(tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("def build(ctx):\n    return [\n")
    assert main(["train", *SMALL, "--model", f"{broken}:build"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not import (SyntaxError" in err


@pytest.mark.timeout(120)
def test_a_factory_that_builds_different_networks_on_different_ranks_is_refused(tmp_path):
    proc = run_group([sys.executable, "-m", "pipeline", "train", *SMALL, "--model", f"{BAD}:by_rank", "--stages", "3",
                      "--threads", "1"], timeout=100)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f"error: stage 0: --model {BAD}:by_rank built different networks on different "
                                        f"ranks (stage 0 and stage 1 differ): the factory must depend on its context only"]


@pytest.mark.timeout(240)
def test_a_users_network_trained_by_dfa_as_3_stages_equals_one_process(tmp_path):
    def run(out, **kw):
        cfg = small_config(model="networks.plain:build", loss="dfa", data__synthetic_train_size=96, data__batch_size=16,
                           run__out=str(out), **kw)
        return lp.train(cfg)

    run(tmp_path / "sequential")
    summary = run_pipeline(small_config(model="networks.plain:build", loss="dfa", data__synthetic_train_size=96,
                                        data__batch_size=16, run__out=str(tmp_path / "pipeline"), pipeline__stages=3,
                                        pipeline__dfa_sync=True))
    assert all(s["dfa_delay_max"] == 0 for s in summary["stage_stats"])  # each error applied in step
    reference = _results(tmp_path / "sequential")
    assert all(k.startswith("feedback") or not k.startswith("heads") for k in reference[2][1])  # no heads: DFA
    assert "feedback" in reference[2][1] and reference[2][1]["feedback"].shape == (10, 16 * 14 * 14)
    _assert_same(_results(tmp_path / "pipeline"), reference)


def test_a_network_the_meta_device_cannot_build_is_dry_run_on_the_cpu():
    from pipeline.model.factories import build_blocks, resolve

    cfg = small_config(model="networks.plain:data_dependent")
    shape = resolve(cfg)[2]
    assert [(b.input, b.output) for b in shape.blocks] == [((1, 28, 28), (32,)), ((32,), (10,))]
    assert build_blocks(cfg, (1, 28, 28), 10)[0].layer.scale == 0.75


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
print("script body ran", flush=True)

from torch import nn
import pipeline as lp
from helpers import small_config


def build(ctx):
    return lp.Network([lp.BlockSpec(lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 16))),
                       lp.OutputSpec(lambda: nn.Linear(16, ctx.num_classes))])


if __name__ == "__main__":
    summary = lp.train(small_config(data__synthetic_train_size=64, pipeline__stages=2, pipeline__transport="zmq"), build)
    print("trained", summary["stages"], summary["config"]["model"]["name"].endswith("script.py:build"))
"""


@pytest.mark.timeout(120)
def test_a_script_that_trains_its_own_factory_runs_its_body_once_per_process(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(tests=HERE))
    proc = run_group([sys.executable, str(script)], timeout=100)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the script itself, then each spawned stage process imports it once (as every multiprocessing program does)
    assert proc.stdout.count("script body ran") == 3 and "trained 2 True" in proc.stdout, proc.stdout


FACTORY = """
from torch import nn
import pipeline as lp


def build(ctx):
    return lp.Network([lp.BlockSpec(lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, {width}))),
                       lp.OutputSpec(lambda: nn.Linear({width}, ctx.num_classes))])
"""


@pytest.mark.timeout(120)
def test_a_checkpoint_of_a_factory_that_changed_since_is_refused(tmp_path):
    factory, ckpt = tmp_path / "net.py", tmp_path / "ckpt"
    run = [sys.executable, "-m", "pipeline", "train", *SMALL, "--model", f"{factory}:build", "--checkpoint-dir", str(ckpt)]
    factory.write_text(FACTORY.format(width=16))
    assert run_group(run, timeout=60).returncode == 0
    factory.write_text(FACTORY.format(width=24))  # the same --model, another network
    resumed = run_group(run + ["--resume", "--epochs", "2"], timeout=60)
    assert resumed.returncode == 2 and resumed.stderr.count("\n") == 1, resumed.stderr
    assert "was written by another run (network differ)" in resumed.stderr


EAGER = os.path.join(HERE, "networks", "eager.py")


def _eager(out, **kw):
    return small_config(model=f"{EAGER}:build", data__synthetic_train_size=96, data__synthetic_test_size=32,
                        data__batch_size=16, run__out=str(out), **kw)


@pytest.mark.timeout(240)
def test_a_factory_that_builds_its_modules_up_front_gives_the_same_weights_in_every_process(tmp_path):
    """The factory runs under the run's seed in every process, whatever each process drew before (the launcher has
    run the dry run and drawn its data order; a stage process has not)."""
    lp.train(_eager(tmp_path / "sequential"))
    reference = _results(tmp_path / "sequential")
    for stages, transport in ((2, "zmq"), (3, "dist")):
        lp.train(_eager(tmp_path / f"{stages}", pipeline__stages=stages, pipeline__transport=transport))
        _assert_same(_results(tmp_path / f"{stages}"), reference)


@pytest.mark.timeout(120)
def test_a_factory_whose_weights_differ_between_processes_is_refused(tmp_path):
    proc = run_group([sys.executable, "-m", "pipeline", "train", *SMALL, "--model", f"{EAGER}:by_process",
                      "--stages", "3", "--threads", "1"], timeout=100)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        f"error: stage 0: --model {EAGER}:by_process: block 0 starts from different weights in stage 0 and stage 2: "
        "the factory draws random numbers or reads values that differ between processes (build modules in the specs, "
        "or only from the run's seed)"]


def _torchvision(out, **kw):
    return small_config(model="networks.torchvision_resnet:build", like="cifar10", data__synthetic_train_size=24,
                        data__synthetic_test_size=8, data__batch_size=8, run__out=str(out), **kw)


@pytest.mark.timeout(240)
def test_torchvision_resnet18_through_from_modules_as_1_2_and_3_stages_is_bit_identical(tmp_path):
    from pipeline.model.factories import build_blocks

    lp.train(_torchvision(tmp_path / "1"))
    reference = _results(tmp_path / "1")
    blocks = build_blocks(_torchvision(None), (3, 32, 32), 10)
    assert len(blocks) == 6  # stem, layer1..4, the output (avgpool, flatten, fc)
    assert sum(p.numel() for b in blocks for p in b.layer.parameters()) == 11_181_642  # torchvision's, 10 classes
    counts = [sum(p.numel() for p in b.parameters()) for b in blocks]  # heads included
    for stages, transport in ((2, "dist"), (3, "threads")):
        summary = run_pipeline(_torchvision(tmp_path / f"{stages}", pipeline__stages=stages), transport)
        _assert_same(_results(tmp_path / f"{stages}"), reference)
        for stats in summary["stage_stats"]:  # each stage process holds its own blocks' parameters, no others
            assert stats["memory"]["parameters"] == sum(counts[i] for i in stats["blocks"]) < sum(counts)


def test_from_modules_materializes_only_the_blocks_asked_for(monkeypatch):
    """The model is made on the meta device; a block materializes its own children and nothing else."""
    from pipeline.model.factories import build_blocks, resolve

    materialized = []
    to_empty = torch.nn.Module.to_empty
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda self, **kw: materialized.append(
        sum(p.numel() for p in self.parameters())) or to_empty(self, **kw))
    cfg = _torchvision(None, run__seed=11)
    resolve(cfg)  # the factory and the dry run (on the meta device)
    assert materialized == []
    (block,) = build_blocks(cfg, (3, 32, 32), 10, indices=[4])
    assert materialized == [8_393_728]  # layer4 of resnet18, alone
    assert not any(p.is_meta for p in block.parameters())


def test_from_modules_refuses_what_it_cannot_cut_or_initialise():
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.weight[:, None, None]

    with pytest.raises(lp.ConfigError, match="no child named 'layer9'"):
        lp.from_modules(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.Linear(3, 2)), starts=["layer9"])
    with pytest.raises(lp.ConfigError, match="2 rules for 1 hidden blocks"):
        lp.from_modules(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.Linear(3, 2)), rules=[None, None])
    def tied():
        first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        second.weight = first.weight
        return torch.nn.Sequential(torch.nn.Sequential(first, second), torch.nn.Linear(4, 2))

    with pytest.raises(lp.ConfigError, match="shares parameters between its modules"):
        lp.from_modules(tied).blocks[0].layer()
    network = lp.from_modules(lambda: torch.nn.Sequential(Scale(), torch.nn.Flatten(), torch.nn.Linear(3 * 4, 2)),
                              starts=[0, 1])
    with pytest.raises(lp.ConfigError, match=r"Scale \(0\) has parameters or buffers but no reset_parameters"):
        network.blocks[0].layer()
