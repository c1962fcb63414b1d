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
