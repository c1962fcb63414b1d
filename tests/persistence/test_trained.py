"""A finished run back as a network: evaluate reproduces summary.json, load gives the sequential logits, bad files exit 2."""

import json

import pytest
import torch

import pipeline
from pipeline.cli import build_parser, config_from_args, main
from pipeline.run.in_process import run_in_process
from pipeline.data import BatchSource
from pipeline.persistence.trained import early_exit, evaluate, run_config

SMALL = ["--dataset", "synthetic", "--synthetic-train-size", "256", "--synthetic-test-size", "96", "--batch-size", "32",
         "--num-layers", "2", "--num-hidden", "32", "--dropout", "0.1", "--nonlin", "leakyrelu", "--lr", "2e-3",
         "--no-progress", "--threads", "1", "--epochs", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same network trained sequentially and as 3 stages (threads: every stage writes its own weights file),
    two of its blocks split (their layers on one stage, their heads on the next: each half saved by its own stage)."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", *SMALL, "--out", str(root / "seq")]) == 0
    run_in_process(config_from_args(build_parser().parse_args(
        ["train", *SMALL, "--stages", "3", "--partition", "0.5,1,1.5", "--out", str(root / "k3")])))
    assert len(list((root / "k3").glob("weights-stage*.pt"))) == 3
    return root


def summary_errors(folder):
    return json.loads((folder / "summary.json").read_text())["layer_test_errors"]


@pytest.mark.parametrize("name", ["seq", "k3"])
def test_evaluate_reproduces_the_runs_per_layer_test_errors_exactly(runs, name):
    result = evaluate(str(runs / name))
    assert result.layer_test_errors == summary_errors(runs / name) and result.examples == 96


def test_the_evaluate_command_prints_every_layer(runs, capsys):
    assert main(["evaluate", str(runs / "k3"), "--exit-threshold", "0.5", "0.9", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    errors = summary_errors(runs / "k3")
    assert f"     0  {errors[0]:.2f}%" in out and f"output  {errors[-1]:.2f}%" in out
    assert out.count("early exit at confidence") == 3
    assert f"confidence >= 1: accuracy {100 - errors[-1]:.2f}%, average depth 3.00 of 3 blocks" in out  # all at the output


def test_load_of_a_3_stage_run_gives_the_sequential_networks_logits(runs):
    seq, k3 = pipeline.load(str(runs / "seq")), pipeline.load(str(runs / "k3"))
    assert not k3.training and not any(m.training for m in k3.modules())
    x = next(BatchSource(run_config(str(runs / "seq")).data, 1).eval_batches()).x
    logits = k3(x)
    assert logits.shape == (32, 10) and torch.equal(logits, seq(x))
    scores = k3.local_classifiers(x)
    assert len(scores) == 3 and scores[0].shape == (32, 10) and torch.equal(scores[-1], logits)


def test_early_exit_answers_at_the_first_confident_layer():
    labels = torch.tensor([0, 1, 1])
    first = torch.tensor([[9.0, 0.0], [0.0, 9.0], [0.1, 0.0]])  # sure and right, sure and right, unsure (0.52)
    third = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 0.0]])  # example 2: 0.95 sure of the wrong class
    output = torch.tensor([[0.0, 1.0]] * 3)  # says 1 for everyone
    scores = [first, None, third, output]
    assert early_exit(scores, labels, 0.99) == (3, 1 + 1 + 4)  # example 2 reaches the output, which is right
    assert early_exit(scores, labels, 0.9) == (2, 1 + 1 + 3)  # example 2 stops at block 3, wrongly
    assert early_exit(scores, labels, 0.0) == (2, 3)  # everyone at block 1
    assert early_exit(scores, labels, 1.01) == (2, 12)  # everyone at the output


def test_a_dfa_run_has_no_local_classifiers_but_evaluates(tmp_path):
    assert main(["train", *SMALL[:-2], "--epochs", "1", "--loss", "dfa", "--out", str(tmp_path)]) == 0
    assert evaluate(str(tmp_path)).layer_test_errors == summary_errors(tmp_path)
    assert pipeline.load(str(tmp_path)).local_classifiers(torch.zeros(2, 1, 28, 28))[0] is None


def damage(folder, how, other):
    path = folder / "weights-stage0.pt"
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "garbage":
        path.write_bytes(b"not a torch file at all")
    elif how == "foreign tensors":
        torch.save({"weight": torch.zeros(3)}, path)
    elif how == "another network":
        path.write_bytes((other / "weights-stage0.pt").read_bytes())
    elif how == "missing":
        path.unlink()
    elif how == "no summary":
        (folder / "summary.json").unlink()
    elif how == "foreign summary":
        (folder / "summary.json").write_text('{"config": {"model": {"layers": 3}}}')


DAMAGES = {"truncated": "cannot read", "garbage": "cannot read", "foreign tensors": "is not a weights file of this project",
           "another network": "do not fit its config's network", "missing": "no weights-stage*.pt",
           "no summary": "no readable summary.json", "foreign summary": "holds no config of this project"}


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_or_foreign_files_exit_2_with_one_line(how, tmp_path, capsys):
    run, other = tmp_path / "run", tmp_path / "other"
    tiny = ["--dataset", "synthetic", "--synthetic-train-size", "32", "--synthetic-test-size", "32", "--batch-size", "32",
            "--no-progress", "--num-hidden", "8"]
    assert main(["train", *tiny, "--out", str(run)]) == 0
    assert main(["train", *tiny[:-1], "16", "--out", str(other)]) == 0
    capsys.readouterr()
    damage(run, how, other)
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and DAMAGES[how] in err and "Traceback" not in err


def test_a_run_from_another_machine_loads_here(runs, tmp_path):
    """A summary written on a GPU cluster (CUDA, CURVE keys, TensorBoard, checkpoints, restarts) is read back on this
    machine: what the machine offers is judged where a run starts, not when its config is read."""
    summary = json.loads((runs / "k3" / "summary.json").read_text())
    summary["config"]["run"].update(device="cuda", tensorboard=str(tmp_path / "gone-tb"), checkpoint_dir=str(tmp_path / "gone"),
                                    checkpoint_every=5, auto_resume=True, max_restarts=3)
    summary["config"]["pipeline"].update(zmq_curve_keys=str(tmp_path / "gone-keys"), dist_backend="nccl")
    other = tmp_path / "cluster-run"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps(summary))
    cfg = run_config(str(other))
    assert (cfg.run.device, cfg.pipeline.stages, cfg.run.precision) == ("cpu", 1, "fp32")
    # tied to none of the run's processes and outputs: training it on does not touch its checkpoints
    assert (cfg.run.checkpoint_dir, cfg.run.auto_resume, cfg.run.tensorboard, cfg.pipeline.zmq_curve_keys) == (None, False, None, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_evaluate_on_a_missing_gpu_is_one_line_and_exit_2(runs, capsys):
    assert main(["evaluate", str(runs / "seq"), "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "error: --device cuda but no CUDA GPU is visible: use --device cpu\n"
