"""zmq across hosts: a loopback --zmq-host is refused once the stages span hosts, by every rank alike."""

import pytest

from helpers import init_gloo, run_ranks
from pipeline.config import ConfigError
from pipeline.transport.zmq import check_bind_host

LOOPBACK_ACROSS_HOSTS = "--zmq-host 127.0.0.1 is loopback but the stages run on 2 hosts (a, b): use --zmq-host 0.0.0.0 or this node's address"


@pytest.mark.parametrize("bind_host,hosts", [("127.0.0.1", ["a", "a", "a"]), ("0.0.0.0", ["a", "b"]),
                                             ("10.1.2.3", ["a", "b"]), ("node0.cluster", ["a", "b"])])
def test_a_host_peers_can_reach_is_accepted(bind_host, hosts):
    check_bind_host(bind_host, hosts)


@pytest.mark.parametrize("bind_host", ["127.0.0.1", "localhost", "127.0.1.1", "::1"])
def test_loopback_across_hosts_is_refused(bind_host):
    with pytest.raises(ConfigError, match=f"--zmq-host {bind_host} is loopback but the stages run on 2 hosts"):
        check_bind_host(bind_host, ["a", "a", "b", "a"])


def _open_on_two_hosts(rank, world, port, results):
    import socket

    import torch

    from pipeline.transport.zmq import open_zmq

    socket.gethostname = lambda: "ab"[rank]  # as if each rank ran on its own node
    init_gloo(rank, world, port)
    try:
        open_zmq(rank, world, torch.device("cpu"), "127.0.0.1")
        results.put((rank, "opened"))
    except ConfigError as exc:
        results.put((rank, str(exc)))


@pytest.mark.timeout(120)
def test_every_rank_refuses_a_loopback_zmq_host_across_hosts():
    assert run_ranks(_open_on_two_hosts, 2, timeout=90) == [LOOPBACK_ACROSS_HOSTS] * 2


ARGS = ["-m", "pipeline", "train", "--dataset", "synthetic", "--num-layers", "2", "--num-hidden", "32",
        "--batch-size", "32", "--synthetic-train-size", "640", "--synthetic-test-size", "64", "--threads", "1",
        "--no-progress", "--seed", "3"]


@pytest.mark.timeout(240)
def test_stages_on_two_nodes_talk_over_tcp_and_train_as_the_sequential_trainer(tmp_path):
    import json
    import socket
    import sys

    import torch

    from helpers import ProcessGroup, run_group
    from pipeline.persistence.checkpoint import load_weights

    reference = run_group([sys.executable, *ARGS, "--out", str(tmp_path / "sequential")], timeout=120)
    assert reference.returncode == 0, reference.stderr
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # two torchrun agents, one stage each, as on two machines: PIPELINE_HOST_NAME tells them apart
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "tcp-test"]
    command = torchrun + ARGS + ["--stages", "2", "--transport", "zmq", "--zmq-host", "0.0.0.0",
                                     "--out", str(tmp_path / "nodes")]
    with ProcessGroup(command, {"PIPELINE_HOST_NAME": "node-a"}) as a, ProcessGroup(command, {"PIPELINE_HOST_NAME": "node-b"}) as b:
        outputs = [a.communicate(timeout=150), b.communicate(timeout=150)]
    assert a.returncode == b.returncode == 0, outputs[0][1][-3000:] + outputs[1][1][-3000:]
    summary = json.loads((tmp_path / "nodes" / "summary.json").read_text())
    assert summary["stage_stats"][1]["inbox"].startswith("tcp://"), summary["stage_stats"][1]["inbox"]
    mine, theirs = load_weights(str(tmp_path / "nodes")), load_weights(str(tmp_path / "sequential"))
    assert sorted(mine) == sorted(theirs) == [0, 1, 2]
    assert all(torch.equal(mine[i][k], theirs[i][k]) for i in theirs for k in theirs[i])
