"""Restarts: a stage killed mid-epoch, the run starts again from its newest checkpoint by itself and ends bit-identical."""

import json
import os
import signal
import struct
import sys
import time

import pytest

from helpers import ProcessGroup, run_group
from pipeline.persistence.checkpoint import load_weights
from pipeline.cli import main
from pipeline.observe.metrics import MetricsWriter
from pipeline.run.runtime import stage_processes
from test_checkpoint import ARGS, _same_weights, _strip, uninterrupted  # noqa: F401 (a fixture)

KILL_AT = 250  # training steps the last stage has finished when stage 1 is killed: epoch 2, between checkpoints


def _steps(path) -> int:
    try:
        return struct.unpack("<q", path.read_bytes()[:8])[0]
    except (OSError, struct.error):
        return -1


@pytest.mark.timeout(300)
@pytest.mark.parametrize("torchrun", [False, True], ids=["local", "torchrun"])
def test_a_killed_stage_restarts_from_the_newest_checkpoint_and_ends_bit_identical(uninterrupted, tmp_path, torchrun):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                    "--max-restarts", "2", "-m", "pipeline", "train"]
    else:
        launcher = [sys.executable, "-m", "pipeline", "train", "--stages", "3", "--max-restarts", "2"]
    args = launcher + [*ARGS, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "20", "--out", str(out),
                       "--transport", "zmq"]
    last = ckpt / "progress" / "stage-2"
    with ProcessGroup(args) as proc:
        deadline = time.monotonic() + 150
        while _steps(last) < KILL_AT:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else ""
            time.sleep(0.002)
        os.kill(stage_processes(proc.pid)[1], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=200)
    assert proc.returncode == 0, stderr[-3000:]
    restarts = json.loads((out / "summary.json").read_text())["restarts"]
    assert restarts["count"] == 1 and len(restarts["history"]) == 1, restarts
    (entry,) = restarts["history"]
    resumed, reached = entry["resumed_from"]["step"], entry["steps_reached"]
    assert resumed % 20 == 0 and resumed <= min(reached) and reached[2] >= KILL_AT, entry
    assert entry["batches_trained_again"] == [r - resumed for r in reached]
    assert f"restart 1: resuming from {ckpt}" in stderr
    weights, metrics = uninterrupted
    assert _same_weights(load_weights(str(out)), weights)
    assert _strip((out / "metrics.jsonl").read_text().splitlines()) == _strip(metrics)


@pytest.mark.timeout(120)
def test_a_restart_without_a_checkpoint_trains_from_the_start_and_says_so(tmp_path):
    """Killed before its first checkpoint (there is none: no --checkpoint-every), the run starts over; the summary
    counts the whole first attempt as trained again."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    args = [sys.executable, "-m", "pipeline", "train", *ARGS, "--epochs", "1", "--stages", "2", "--transport", "zmq",
            "--max-restarts", "1", "--checkpoint-dir", str(ckpt), "--out", str(out)]
    with ProcessGroup(args) as proc:
        deadline = time.monotonic() + 90
        # both stages past 10 steps: stage 0 learns a batch after it hands it on, so stage 1 may count it first
        while min(_steps(ckpt / "progress" / f"stage-{k}") for k in (0, 1)) < 10:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else ""
            time.sleep(0.002)
        os.kill(stage_processes(proc.pid)[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=100)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"restart 1: no complete checkpoint under {ckpt}: training from the start" in stderr
    (entry,) = json.loads((out / "summary.json").read_text())["restarts"]["history"]
    assert entry["resumed_from"] is None and entry["batches_trained_again"] == entry["steps_reached"]
    assert min(entry["steps_reached"]) >= 10


def test_a_failure_without_restarts_left_ends_the_run(tmp_path):
    """--max-restarts counts: a stage that fails every time is restarted twice, then the run exits 1."""
    proc = run_group([sys.executable, "-m", "pipeline", "train", *ARGS, "--epochs", "1", "--stages", "2",
                      "--transport", "zmq", "--max-restarts", "2", "--synthetic-train-size", "640"],
                     timeout=150, env={"PIPELINE_FAIL_AT": "1:3"})
    assert proc.returncode == 1
    assert proc.stderr.count("injected failure at batch 3") == 3, proc.stderr[-3000:]
    assert "restart 2 of 2" in proc.stderr and "restart 3" not in proc.stderr


def test_a_resumed_run_drops_the_epochs_recorded_after_its_checkpoint(tmp_path):
    """A run that failed after recording epoch 2 but resumes from a checkpoint inside epoch 2 records it once."""
    MetricsWriter(str(tmp_path)).epoch({"epoch": 1})
    first = MetricsWriter(str(tmp_path), resumed_epoch=2)
    first.epoch({"epoch": 2, "attempt": 0})
    MetricsWriter(str(tmp_path), resumed_epoch=2).epoch({"epoch": 2, "attempt": 1})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"epoch": 1}, {"epoch": 2, "attempt": 1}]
    MetricsWriter(str(tmp_path))  # a fresh run starts an empty file
    assert (tmp_path / "metrics.jsonl").read_text() == ""


@pytest.mark.parametrize("args,message", [
    (["--max-restarts", "1"], "--max-restarts restarts the stage processes of the local launcher: it needs --stages 2"),
    (["--stages", "2", "--max-restarts", "-1"], "--max-restarts must be >= 0, got -1"),
    (["--auto-resume"], "--resume, --auto-resume and --checkpoint-every need --checkpoint-dir DIR")])
def test_restart_options_are_checked_with_one_line(args, message, capsys):
    assert main(["train", *ARGS, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_restart_of_a_run_stopped_by_a_signal_stops_at_once(tmp_path, monkeypatch, capsys):
    """A signal that reached torchrun's workers, not its agent: they stop (EXIT_STOPPED), the agent takes that for a
    failure and restarts them, and the restart must not train on."""
    from pipeline.run.restarts import EXIT_STOPPED, mark_stopped
    from pipeline.config import Config, RunConfig

    ckpt = tmp_path / "ckpt"
    (ckpt / "progress").mkdir(parents=True)
    mark_stopped(Config(run=RunConfig(checkpoint_dir=str(ckpt))), {"epoch": 1, "batch": 7, "step": 7})
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert main(["train", *ARGS, "--checkpoint-dir", str(ckpt)]) == EXIT_STOPPED
    assert "restart 1: the run was stopped by a signal at epoch 1 batch 7: not training on" in capsys.readouterr().err
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # a new launch (a requeue) clears the note
    from pipeline.run.restarts import record_start, stopped_before

    record_start(Config(run=RunConfig(checkpoint_dir=str(ckpt))), 0)
    assert stopped_before(Config(run=RunConfig(checkpoint_dir=str(ckpt))), 1) is None


def test_a_signal_while_the_stages_restart_reaches_the_new_ones(monkeypatch):
    from pipeline.run import launcher as local
    from test_interrupt import _Stage

    sent = []
    monkeypatch.setattr(local.os, "kill", lambda pid, signum: sent.append((pid, signum)))
    processes = [_Stage(11, False)]  # the failed attempt's, gone
    forward = local._forwarder(processes)
    forward(signal.SIGTERM, None)
    assert sent == [] and forward.signalled == signal.SIGTERM
    processes[:] = [_Stage(21, True), _Stage(22, True)]  # the restart's
    forward.resend()  # what launch() does once they are started
    assert sent == [(21, signal.SIGTERM), (22, signal.SIGTERM)]


def test_a_progress_file_starts_at_its_attempt_s_first_step(tmp_path):
    from pipeline.config import Config, RunConfig
    from pipeline.run.restarts import ProgressFile

    cfg = Config(run=RunConfig(checkpoint_dir=str(tmp_path)))
    ProgressFile(cfg, 0).finished(500)  # an earlier run's count
    ProgressFile(cfg, 0, start_step=40)  # a resumed attempt that has trained nothing yet
    assert _steps(tmp_path / "progress" / "stage-0") == 40
