"""The tests' process groups: a test that fails while a multi-process run is under way leaves nothing behind."""

import sys
import time
import uuid

import pytest

from helpers import ProcessGroup
from test_launch import RUN, _leftovers


@pytest.mark.timeout(120)
def test_a_failing_test_kills_the_whole_run(tmp_path):
    token = uuid.uuid4().hex
    # under torchrun: its workers outlive an agent killed alone (the local launcher's stages follow their parent)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3"]
    args = torchrun + RUN[1:] + ["--transport", "zmq", "--synthetic-train-size", "20000", "--epochs", "50"]
    with pytest.raises(AssertionError, match="the test failed"):
        with ProcessGroup(args, {"PIPELINE_TEST_TOKEN": token}) as proc:
            deadline = time.monotonic() + 90
            while len(_leftovers(token)) < 4:  # the agent and its three workers
                assert proc.poll() is None and time.monotonic() < deadline, "the stages did not start"
                time.sleep(0.2)
            raise AssertionError("the test failed")
    deadline = time.monotonic() + 10
    while (left := _leftovers(token)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == []
