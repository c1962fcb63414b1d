"""Launching: the local launcher and torchrun give the same run; a failing stage ends every process, loudly."""

import glob
import json
import os
import subprocess
import sys
import time
import uuid

import pytest

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
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    elapsed = time.monotonic() - started
    time.sleep(0.5)
    return proc, elapsed, _leftovers(token)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport,fail_at", [("dist", "1:10"), ("zmq", "0:10"), ("local", "2:10")])
def test_a_failing_stage_ends_the_run_with_its_traceback(transport, fail_at):
    proc, elapsed, left = _run(RUN + ["--stages", "3", "--transport", transport, "--synthetic-train-size", "50000"],
                               env={"PIPELINE_FAIL_AT": fail_at})
    stage = fail_at.split(":")[0]
    assert proc.returncode == 1
    assert f"error: stage {stage} (pid" in proc.stderr and "Traceback" in proc.stderr
    assert "RuntimeError: injected failure at batch 10" in proc.stderr
    assert f"stage {stage} exited with code 1; stopped the other stages" in proc.stderr
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
    assert left == []


def test_stages_must_match_torchrun_world(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc, _, _ = _run(torchrun + RUN[1:] + ["--stages", "3"])
    assert proc.returncode != 0 and "--stages 3 but torchrun started 2 processes" in proc.stderr
