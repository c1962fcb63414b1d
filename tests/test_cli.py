"""The command line: exit 0 after a run, exit 2 with one clear line (no traceback) for bad input."""

import json
import subprocess
import sys

import pytest
import torch

from pipeline.cli import main

SMALL = ["--dataset", "synthetic", "--synthetic-train-size", "64", "--synthetic-test-size", "32", "--batch-size", "32",
         "--num-hidden", "16", "--no-progress"]

BAD_INPUT = [
    (["--model", "resnet5"], "unknown --model 'resnet5'"),
    (["--dataset", "imagenet7"], "unknown --dataset"),
    (["--loss", "magic"], "unknown --loss"),
    (["--optim", "lbfgs"], "unknown --optim"),
    (["--nonlin", "swish"], "unknown --nonlin"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "-0.1"], "--lr must be > 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--beta", "2"], "--beta must be in [0, 1]"),
    (["--num-layers", "0"], "--num-layers must be >= 1"),
    (["--lr", "abc"], "invalid float value"),
    (["--stages", "9"], "more than the 2 blocks"),
    (["--stages", "2", "--partition", "1,2"], "--partition sums to 3"),
    (["--stages", "2", "--partition", "1"], "--partition has 1 sizes"),
    (["--partition", "1,x"], "expected block counts like 2,1,1"),
    (["--stages", "2", "--partition", "1.25,1.75"], "--partition sizes are whole or half blocks"),
    (["--num-layers", "2", "--stages", "2", "--partition", "2.5,0.5"], "puts block 2's heads on another stage than its layer, but it is the output classifier"),
    (["--num-layers", "2", "--stages", "2", "--partition", "1.5,1.5", "--loss", "dfa"], "but it has no local heads (DFA trains it from the output error)"),
    (["--num-layers", "2", "--stages", "2", "--partition", "1.5,1.5", "--precision", "fp16", "--device", "cpu"], "--precision fp16"),
    (["--heads-max-delay", "-1"], "--heads-max-delay must be >= 0"),
    (["--stages", "2", "--partition", "1h,1"], "an h goes on a stage that ends inside a block"),
    (["--stages", "2", "--partition", "1.5h"], "--partition has 1 sizes but --stages is 2"),
    (["--num-layers", "3", "--stages", "3", "--partition", "1.5h,1,1.5"], "must be the only split block of both its stages"),
    (["--stages", "2", "--partition", "1.5hh,0.5"], "expected block counts like 2,1,1"),
    (["--num-layers", "2", "--stages", "2", "--partition", "1.5h,1.5", "--loss", "dfa"], "but it has no local heads"),
    (["--hidden-sizes", "800,0"], "--hidden-sizes must be widths >= 1"),
    (["--stages", "2", "--loss", "backprop"], "needs the whole network in one process"),
    (["--stages", "2", "--loss", "fa"], "needs the whole network in one process"),
    (["--dfa-sync"], "--dfa-sync applies to --loss dfa only"),
    (["--log-alignment", "0"], "--log-alignment must be >= 1"),
    (["--bio", "--loss", "backprop"], "--bio changes the local heads"),
    (["--transport", "carrier-pigeon"], "unknown --transport"),
    (["--queue-depth", "0"], "--queue-depth must be >= 1"),
    (["--device", "tpu"], "unknown --device"),
    (["--bogus-flag"], "unrecognized arguments"),
    (["--stall-timeout", "0"], "--stall-timeout must be > 0"),
    (["--checkpoint-every", "0", "--checkpoint-dir", "x"], "--checkpoint-every must be >= 1"),
    (["--checkpoint-every", "often"], "expected a count of batches"),
    (["--checkpoint-every", "5"], "--resume, --auto-resume and --checkpoint-every need --checkpoint-dir"),
    (["--resume"], "--resume, --auto-resume and --checkpoint-every need --checkpoint-dir"),
    (["--dfa-max-delay", "-1", "--loss", "dfa"], "--dfa-max-delay must be >= 0"),
    (["--model", "vgg8b", "--feat-mult", "0.001"], "leaves a vgg8b layer with no feature maps"),
    (["--master-port", "70000"], "--master-port must be in [0, 65535]"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--synthetic-like", "imagenet"], "unknown --synthetic-like"),
    (["--stages", "0"], "--stages must be >= 1, got 0"),
    (["--stages", "-3"], "--stages must be >= 1, got -3"),
    (["--batch-size", "65"], "--batch-size 65 is larger than the 64 examples of the synthetic training set"),
    (["--batch-size", "1"], "--batch-size 1 cannot train batch norm (block 0 has it, and a batch of one has no variance where it normalises one value per channel)"),
    (["--out", "/proc/nope"], "--out /proc/nope cannot be written"),
    (["--checkpoint-dir", "/proc/nope", "--checkpoint-every", "5"], "--checkpoint-dir /proc/nope cannot be written"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_exits_2_with_one_line(args, message, capsys):
    assert main(["train", *SMALL, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err and "Traceback" not in err


def test_missing_data_root_without_network_exits_2(tmp_path, capsys):
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "none"), "--no-download", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mnist not found" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_exits_2(capsys):
    assert main(["train", *SMALL, "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_a_run_exits_0_and_writes_summary(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", *SMALL, "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"test_error", "layer_test_errors", "train_samples_per_s", "wall_s", "config"}
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert "epoch 1: test error" in proc.stdout + proc.stderr


def test_bad_input_through_the_real_entry_point_exits_2():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", "--batch-size", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_a_diverging_run_stops_with_the_batch_and_block_named(capsys):
    assert main(["train", *SMALL, "--optim", "sgd", "--lr", "1e30"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "epoch 1 batch 1, block 0: loss is not finite" in err


def test_skip_nonfinite_counts_the_skipped_updates(tmp_path):
    assert main(["train", *SMALL, "--optim", "sgd", "--lr", "1e30", "--skip-nonfinite", "--out", str(tmp_path)]) == 0
    skipped = json.loads((tmp_path / "summary.json").read_text())["skipped_updates"]
    assert int(skipped["0"]) >= 1


def test_a_rendezvous_port_in_use_exits_2_before_any_stage_starts(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["train", *SMALL, "--stages", "2", "--master-port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"address 127.0.0.1:{port} is in use" in err


def test_a_zmq_host_that_is_not_this_machine_exits_2(capsys):
    assert main(["train", *SMALL, "--stages", "2", "--transport", "zmq", "--zmq-host", "192.0.2.77"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--zmq-host 192.0.2.77 cannot be bound on this machine" in err


def test_an_out_under_a_file_exits_2_before_training(tmp_path, capsys, monkeypatch):
    import pipeline.sequential

    monkeypatch.setattr(pipeline.sequential.SequentialTrainer, "run", lambda *a, **k: pytest.fail("training started"))
    (tmp_path / "file").write_text("not a folder")
    assert main(["train", *SMALL, "--out", str(tmp_path / "file" / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be written" in err


def test_a_batch_larger_than_mnist_exits_2_before_any_process_starts(tmp_path):
    # judged from the dataset's known size: no data is read (the folder does not even exist), no stage starts
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", "--dataset", "mnist", "--data-dir", str(tmp_path / "none"),
                           "--no-download", "--batch-size", "100000", "--stages", "2", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--batch-size 100000 is larger than the 60000 examples of the mnist training set" in proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_batch_whose_similarity_matrices_do_not_fit_exits_2(monkeypatch, capsys):
    import pipeline.cli
    import pipeline.run.resources

    monkeypatch.setattr(pipeline.run.resources, "device_memory", lambda device: (16 * 2 ** 30, "this host (RAM)"))
    monkeypatch.setattr(pipeline.cli, "launch", lambda cfg: pytest.fail("stages started"))
    args = ["--dataset", "mnist", "--data-dir", "none", "--no-download", "--no-progress", "--stages", "2"]
    assert main(["train", *args, "--batch-size", "60000"]) == 2  # one 60000x60000 fp32 matrix alone is 14.4 GB
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch-size 60000 needs about" in err and "16.0 GiB" in err
    # the estimate grows with B^2 and sums the stages that share the host; a reasonable batch passes
    from helpers import small_config

    small, large = (pipeline.run.resources.stage_bytes(small_config(data__batch_size=b, stages=2)) for b in (32, 3200))
    assert len(small) == 2 and large[0] > pipeline.run.resources.SIM_COPIES * 4 * 3200 ** 2 > 100 * small[0]
    pipeline.run.resources.check_memory(small_config(data__batch_size=128, data__synthetic_train_size=128))


def test_progress_in_a_log_is_a_few_lines_without_carriage_returns(capsys):
    args = [a for a in SMALL if a != "--no-progress"]
    args[args.index("--synthetic-train-size") + 1] = "640"  # 20 batches of 32
    assert main(["train", *args, "--epochs", "2"]) == 0
    err = capsys.readouterr().err
    progress = [line for line in err.splitlines() if "batches" in line]
    assert "\r" not in err and len(progress) == 20, err  # one line per tenth of each epoch
    assert progress[0].startswith("epoch 1: 2/20 batches (10%)") and progress[-1].startswith("epoch 2: 20/20 batches (100%)")


def test_line_progress_without_a_known_length_writes_once_a_minute():
    import io

    from pipeline.observe.progress import LineProgress

    log = io.StringIO()
    bar = LineProgress(None, desc="epoch 1", file=log, every_s=3600)
    for _ in range(1000):
        bar.update()
    assert log.getvalue() == ""
    bar.every_s = 0
    bar.update()
    assert log.getvalue().startswith("epoch 1: 1001 batches,")


def test_dfa_left_at_its_defaults_gets_the_measured_recipe():
    from pipeline.cli import build_parser, config_from_args

    def config(*flags):
        return config_from_args(build_parser().parse_args(["train", *SMALL, *flags]))

    dfa = config("--loss", "dfa")
    assert (dfa.model.nonlin, dfa.model.batch_norm, dfa.data.augment) == ("tanh", False, False)
    assert (dfa.optim.lr, dfa.optim.lr_decay_milestones, dfa.optim.lr_decay_fact) == (1e-3, (4, 7), 0.3)
    local = config()
    assert (local.model.nonlin, local.model.batch_norm, local.data.augment, local.optim.lr) == ("relu", True, True, 5e-4)
    assert local.optim.lr_decay_milestones == (200, 300, 350, 375)
    # what the user sets wins, in both directions
    chosen = config("--loss", "dfa", "--batch-norm", "--augment", "--lr", "2e-4", "--nonlin", "relu", "--lr-decay-fact", "0.5")
    assert (chosen.model.batch_norm, chosen.data.augment, chosen.optim.lr, chosen.model.nonlin) == (True, True, 2e-4, "relu")
    assert chosen.optim.lr_decay_fact == 0.5 and chosen.optim.lr_decay_milestones == (4, 7)
    assert config("--no-batch-norm", "--no-augment").model.batch_norm is False
    # in a pipeline DFA errors are applied in step unless asynchronous updates are asked for
    assert dfa.pipeline.dfa_max_delay == 0 and local.pipeline.dfa_max_delay == 2
    assert config("--loss", "dfa", "--dfa-max-delay", "none").pipeline.dfa_max_delay is None
    assert config("--loss", "dfa", "--dfa-max-delay", "3").pipeline.dfa_max_delay == 3


def test_help_shows_every_resolved_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("Initial learning rate (default 0.0005; under --loss dfa: 0.001)", "(default on; under --loss dfa: off)",
                  "(default 200 300 350 375; under --loss dfa: 4 7)", "(default relu; under --loss dfa: tanh)",
                  "Training and evaluation batch size (default 128)", "Passes over the training set (default 1)",
                  "--dropout DROPOUT Dropout after each nonlinearity; the local loss is taken before it (default 0.0)",
                  "--no-download turn off (on by default): download a dataset that is missing from --data-dir"):
        assert shown in text, shown


def test_the_saved_config_holds_the_resolved_dfa_defaults(tmp_path):
    assert main(["train", *SMALL, "--loss", "dfa", "--out", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "summary.json").read_text())["config"]
    assert config["optim"]["lr"] == 1e-3 and config["model"]["batch_norm"] is False and config["data"]["augment"] is False
