"""Launching: the local launcher and torchrun give the same run; a failing stage ends every process, loudly."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

import torch

from helpers import OutputWatch, ProcessGroup
from pipeline.persistence.checkpoint import load_weights
from pipeline.run.runtime import stage_processes

RUN = [sys.executable, "-m", "pipeline", "train", "--dataset", "synthetic", "--num-layers", "3", "--num-hidden", "32",
       "--threads", "1", "--no-progress", "--batch-size", "32"]


def _leftovers(token: str) -> list[int]:
    """Processes still alive that were started with this test's token in their environment."""
    found = []
    for path in glob.glob("/proc/[0-9]*/environ"):
        try:
            with open(path, "rb") as f:
                if token.encode() in f.read():
                    found.append(int(path.split("/")[2]))
        except OSError:
            continue
    return found


def _run(args, env=None, timeout=120):
    token = uuid.uuid4().hex
    env = {**os.environ, "PIPELINE_TEST_TOKEN": token, **(env or {})}
    started = time.monotonic()
    with ProcessGroup(args, env) as popen:  # a failing test kills what is left of the run
        stdout, stderr = popen.communicate(timeout=timeout)
        elapsed = time.monotonic() - started
        time.sleep(0.5)
        left = _leftovers(token)  # before the group is killed: the launcher itself must have cleaned up
    return subprocess.CompletedProcess(args, popen.returncode, stdout, stderr), elapsed, left


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport,fail_at", [("dist", "1:10"), ("zmq", "0:10"), ("local", "2:10")])
def test_a_failing_stage_ends_the_run_with_its_traceback(transport, fail_at):
    proc, elapsed, left = _run(RUN + ["--stages", "3", "--transport", transport, "--synthetic-train-size", "50000"],
                               env={"PIPELINE_FAIL_AT": fail_at})
    stage = fail_at.split(":")[0]
    assert proc.returncode == 1
    assert f"error: stage {stage} (pid" in proc.stderr and "Traceback" in proc.stderr
    assert "RuntimeError: injected failure at batch 10" in proc.stderr
    assert re.search(rf"stage {stage} \(pid \d+ on .+, cpu\) exited with code 1; stopped the other stages", proc.stderr)
    assert elapsed < 60, elapsed  # the untouched run would take minutes
    assert left == []


@pytest.mark.timeout(180)
def test_a_clean_run_leaves_no_process_behind(tmp_path):
    proc, _, left = _run(RUN + ["--stages", "2", "--transport", "zmq", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    assert left == []
    assert (tmp_path / "summary.json").exists()


def test_bad_input_is_refused_before_any_stage_starts(tmp_path):
    proc, elapsed, left = _run([sys.executable, "-m", "pipeline", "train", "--stages", "2", "--dataset", "mnist",
                                "--data-dir", str(tmp_path / "nowhere"), "--no-download"])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "mnist not found" in proc.stderr
    assert "Traceback" not in proc.stderr and left == []


@pytest.mark.timeout(240)
def test_torchrun_gives_the_same_run_as_the_local_launcher(tmp_path):
    common = RUN + ["--transport", "dist", "--device", "cpu"]
    local, _, _ = _run(common + ["--stages", "3", "--out", str(tmp_path / "local")])
    assert local.returncode == 0, local.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3"]
    tr, _, left = _run(torchrun + common[1:] + ["--out", str(tmp_path / "torchrun")])
    assert tr.returncode == 0, tr.stderr
    a = json.loads((tmp_path / "local" / "summary.json").read_text())
    b = json.loads((tmp_path / "torchrun" / "summary.json").read_text())
    assert a["stages"] == b["stages"] == 3
    assert a["test_error"] == b["test_error"] and a["layer_test_errors"] == b["layer_test_errors"]
    mine, theirs = load_weights(str(tmp_path / "local")), load_weights(str(tmp_path / "torchrun"))
    assert sorted(mine) == sorted(theirs) == [0, 1, 2, 3]  # every block, bit for bit
    assert all(sorted(mine[i]) == sorted(theirs[i]) and all(torch.equal(mine[i][k], theirs[i][k]) for k in mine[i])
               for i in mine)
    assert left == []


def test_stages_must_match_torchrun_world(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc, _, _ = _run(torchrun + RUN[1:] + ["--stages", "3"])
    assert proc.returncode != 0 and "--stages 3 but torchrun started 2 processes" in proc.stderr


def _kill_mid_run(args, victim, stages=3):
    token = uuid.uuid4().hex
    env = {**os.environ, "PIPELINE_TEST_TOKEN": token}
    with ProcessGroup(args, env) as proc:  # a failing test kills what is left of the run
        output = OutputWatch(proc)
        # the last stage reports each tenth of an epoch to a non-terminal: at the first report every stage is training
        output.wait_for("epoch 1: ", timeout=90)
        pids = stage_processes(proc.pid)
        assert len(pids) == stages, pids
        os.kill(pids[victim], signal.SIGKILL)
        killed = time.monotonic()
        _, err = output.finish(timeout=60)
        elapsed = time.monotonic() - killed
        time.sleep(0.5)
        left = _leftovers(token)  # before the group is killed: the launcher itself must have cleaned up
    return proc.returncode, err, elapsed, pids[victim], left


LONG_RUN = ["--synthetic-train-size", "20000", "--epochs", "50"]
# with progress lines (stderr is a pipe, so one line per tenth of an epoch), to tell when training is under way
LONG = [arg for arg in RUN if arg != "--no-progress"] + ["--stages", "3"] + LONG_RUN


@pytest.mark.timeout(180)
# one run per transport, each killing another position: the first stage, a middle one, the last
@pytest.mark.parametrize("transport,victim", [("local", 0), ("zmq", 1), ("dist", 2)])
def test_killing_any_stage_ends_every_process_within_seconds(transport, victim):
    code, err, elapsed, pid, left = _kill_mid_run(LONG + ["--transport", transport], victim)
    assert code == 1 and elapsed < 10, (code, elapsed, err[-2000:])
    assert f"stage {victim} (pid {pid} on" in err and "was killed by SIGKILL" in err
    assert left == []


@pytest.mark.timeout(180)
@pytest.mark.parametrize("victim", [0, 2])  # the first stage (rank 0 plans the run) and the last
def test_killing_a_stage_under_torchrun_ends_every_process_within_seconds(victim):
    # torchrun SIGTERMs the survivors and SIGKILLs them 30 s later; they must not wait for a checkpoint that the
    # dead stage can never complete
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3"]
    code, err, elapsed, pid, left = _kill_mid_run(torchrun + LONG[1:] + ["--transport", "zmq"], victim=victim)
    assert code != 0 and elapsed < 10, (code, elapsed, err[-2000:])
    assert "Signal 9 (SIGKILL)" in err or "SIGKILL" in err
    assert left == []


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", ["dist", "zmq"])
def test_a_stuck_stage_is_detected_by_the_stall_timeout(transport):
    proc, elapsed, left = _run(RUN + ["--stages", "3", "--transport", transport, "--synthetic-train-size", "20000",
                                      "--stall-timeout", "3"], env={"PIPELINE_FAIL_AT": "1:10:hang"})
    assert proc.returncode == 1
    assert "waited 3 s for a batch from stage 1 (--stall-timeout)" in proc.stderr
    assert elapsed < 40 and left == []


