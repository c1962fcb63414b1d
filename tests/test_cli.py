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
    (["--partition", "1,x"], "expected comma-separated integers"),
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
    (["--checkpoint-every", "5"], "--resume and --checkpoint-every need --checkpoint-dir"),
    (["--resume"], "--resume and --checkpoint-every need --checkpoint-dir"),
    (["--dfa-max-delay", "-1", "--loss", "dfa"], "--dfa-max-delay must be >= 0"),
    (["--model", "vgg8b", "--feat-mult", "0.001"], "leaves a vgg8b layer with no feature maps"),
    (["--master-port", "70000"], "--master-port must be in [0, 65535]"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--synthetic-like", "imagenet"], "unknown --synthetic-like"),
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
