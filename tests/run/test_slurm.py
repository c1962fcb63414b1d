"""launch/slurm.sbatch under a stand-in SLURM: the time-limit warning checkpoints and requeues, the requeued job
continues to the end, bit-identical to a run never stopped."""

import json
import os
import signal
import socket
import sys
import time

import pytest

from helpers import ProcessGroup, run_group
from pipeline.persistence.checkpoint import MANIFEST, load_weights
from test_checkpoint import ARGS, _same_weights, _strip, uninterrupted  # noqa: F401 (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# stand-ins for the three SLURM commands the script calls, each doing on this host what SLURM would do for one node
FAKES = {
    "srun": 'while [ "${1#--}" != "$1" ]; do shift; done\necho $$ > "$MARKS/step.pid"\nexec "$@"\n',  # one task
    "scontrol": 'case "$1" in show) echo 127.0.0.1;; requeue) echo "$2" >> "$MARKS/requeued";; esac\n',
    "scancel": 'kill -USR1 "$(cat "$MARKS/step.pid")"\n',  # --signal=USR1 to the step (torchrun's agent)
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
def test_the_time_limit_warning_requeues_the_job_and_the_requeued_job_continues(uninterrupted, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "MARKS": str(tmp_path),
           "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "3",
           "RUN_DIR": str(tmp_path / "run"), "RDZV_PORT": str(_free_port())}
    # the script's own options (cuda, dist, checkpoints every 500) give way to these: argparse keeps the last
    args = ["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), *ARGS, "--device", "cpu", "--transport", "zmq",
            "--checkpoint-every", "20"]
    ckpt, out = tmp_path / "run" / "checkpoints", tmp_path / "run" / "out"
    with ProcessGroup(args, env) as proc:
        deadline = time.monotonic() + 120
        while not list(ckpt.glob(f"step-*/{MANIFEST}")):  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)  # SLURM's --signal=B:USR1@120, to the batch script
        stdout, stderr = proc.communicate(timeout=120)
    assert (tmp_path / "requeued").read_text() == "7\n", stdout + stderr
    stopped_at = json.loads((out / "summary.json").read_text())["stopped_at"]
    assert stopped_at is not None, stdout + stderr
    assert json.loads(max(ckpt.glob(f"step-*/{MANIFEST}")).read_text())["position"] == stopped_at

    requeued = run_group(args, timeout=150, env=env)  # SLURM runs the same script again
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "--auto-resume: resuming from" in requeued.stderr
    assert (tmp_path / "requeued").read_text() == "7\n"  # finished: not requeued again
    weights, metrics = uninterrupted
    assert _same_weights(load_weights(str(out)), weights)
    assert _strip((out / "metrics.jsonl").read_text().splitlines()) == _strip(metrics)
