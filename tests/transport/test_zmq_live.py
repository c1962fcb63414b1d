"""A live zmq stage under a flood of malformed messages: each rejected and logged, memory bounded, training intact."""

import glob
import json
import shutil
import sys
import tempfile
import time

import pytest
import torch
import zmq

from helpers import OutputWatch, ProcessGroup, malformed_messages, small_config
from pipeline.persistence.checkpoint import load_weights
from pipeline.sequential import SequentialTrainer

ROUNDS = 100
ARGS = ["--dataset", "synthetic", "--num-layers", "2", "--num-hidden", "256", "--batch-size", "32", "--dropout", "0.1",
        "--synthetic-train-size", "9600", "--synthetic-test-size", "200", "--epochs", "2", "--threads", "1",
        "--no-progress", "--lr", "1e-3", "--seed", "3", "--nonlin", "leakyrelu"]


def _child(parent: int, name: str) -> int | None:
    for path in glob.glob("/proc/[0-9]*/comm"):
        pid = int(path.split("/")[2])
        try:
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            if open(path).read().strip() == name and ppid == parent:
                return pid
        except (OSError, ValueError, IndexError):
            continue
    return None


@pytest.mark.timeout(240)
def test_a_flood_of_malformed_messages_is_rejected_and_changes_nothing(tmp_path):
    reference = tmp_path / "reference"
    SequentialTrainer(small_config(model__num_layers=2, model__num_hidden=256, data__synthetic_train_size=9600,
                                   data__synthetic_test_size=200, run__epochs=2, run__out=str(reference))).run()
    out = tmp_path / "run"
    private_tmp = tempfile.mkdtemp(prefix="zlive-")  # the run makes its ipc sockets here: only this run's are found
    with ProcessGroup([sys.executable, "-m", "pipeline", "train", *ARGS, "--stages", "2", "--transport", "zmq",
                       "--out", str(out)], env={"TMPDIR": private_tmp}) as proc:
        deadline = time.monotonic() + 90
        while True:  # stage 1's inbox: the ipc socket this run created
            sockets = glob.glob(f"{private_tmp}/localpipe-*/inbox")
            victim = _child(proc.pid, "stage-1")
            if sockets and victim:
                break
            assert proc.poll() is None and time.monotonic() < deadline, "the stages did not start"
            time.sleep(0.1)
        assert len(sockets) == 1, sockets
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 2000)
        push.connect(f"ipc://{sockets[0]}")
        messages = malformed_messages()
        output = OutputWatch(proc)
        for _ in range(ROUNDS):
            for frames in messages.values():
                push.send_multipart(frames)
        rejected = ROUNDS * len(messages)
        # every malformed message reached the stage (the socket stays open until then: closing it drops the queue)
        output.wait_for(f"rejected message {rejected // 1000 * 1000} on", timeout=120)
        push.close()
        _, stderr = output.finish(timeout=180)
    shutil.rmtree(private_tmp, ignore_errors=True)
    assert proc.returncode == 0, stderr[-3000:]
    assert "rejected message 1 on" in stderr and f"rejected message {rejected // 1000 * 1000} on" in stderr
    # what the receive pool allocated, not RSS (an untouched torch.empty of 4 GiB adds nothing to RSS): the real
    # stream's buffers only (activations of 32 KiB), nothing for the flood's declared sizes (up to 4 GiB)
    pooled = json.loads((out / "summary.json").read_text())["stage_stats"][1]["receive_buffer_bytes"]
    assert 0 < pooled < 1 << 20, pooled
    # the real stream went through untouched: bit-identical to the sequential trainer
    mine, theirs = load_weights(str(out)), load_weights(str(reference))
    assert all(torch.equal(mine[i][k], theirs[i][k]) for i in theirs for k in theirs[i])
