"""The control group: all ranks choose the same data backend from every rank's host and GPU, or fail alike."""

import socket

import pytest
import torch

from helpers import init_gloo, run_ranks
from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.run.control import choose_backend, physical_gpu


def cuda(host, gpu):
    return {"host": host, "device": "cuda", "gpu": gpu}


def cpu(host):
    return {"host": host, "device": "cpu"}


# (what, every rank's facts, the backend auto picks)
AUTO = [
    ("one host, 4 GPUs, 4 ranks", [cuda("a", f"GPU-{k}") for k in range(4)], "nccl"),
    ("one GPU shared by 4 ranks (emulation)", [cuda("a", "GPU-0")] * 4, "gloo"),
    ("SLURM: each process sees one GPU as cuda:0, distinct UUIDs", [cuda("a", "GPU-0"), cuda("a", "GPU-1")], "nccl"),
    ("two nodes, 4 and 2 GPUs, 3 + 3 ranks", [cuda("a", "GPU-a0"), cuda("a", "GPU-a1"), cuda("a", "GPU-a2"),
                                             cuda("b", "GPU-b0"), cuda("b", "GPU-b1"), cuda("b", "GPU-b0")], "gloo"),
    ("two nodes, one GPU each", [cuda("a", "GPU-a0"), cuda("b", "GPU-b0")], "nccl"),
    ("one rank on CPU", [cuda("a", "GPU-0"), cpu("a"), cuda("a", "GPU-1")], "gloo"),
    ("all on CPU", [cpu("a"), cpu("b")], "gloo"),
    ("no UUID: host/index names apart", [cuda("a", "a/gpu0"), cuda("a", "a/gpu1")], "nccl"),
    ("same index on two hosts is two GPUs", [cuda("a", "a/gpu0"), cuda("b", "b/gpu0")], "nccl"),
]


@pytest.mark.parametrize("facts,expected", [(f, e) for _, f, e in AUTO], ids=[w for w, _, _ in AUTO])
def test_auto_picks_nccl_iff_every_rank_has_a_gpu_of_its_own(facts, expected):
    assert choose_backend("auto", facts) == expected
    assert choose_backend("gloo", facts) == "gloo"


def test_an_explicit_nccl_that_cannot_work_is_refused():
    assert choose_backend("nccl", [cuda("a", "GPU-0"), cuda("b", "GPU-0b")]) == "nccl"
    with pytest.raises(ConfigError, match="stages 0, 1 share GPU-0 on a: use --dist-backend auto or gloo"):
        choose_backend("nccl", [cuda("a", "GPU-0"), cuda("a", "GPU-0")])
    with pytest.raises(ConfigError, match=r"every stage on a GPU, but stage 1 on cpu \(b\)"):
        choose_backend("nccl", [cuda("a", "GPU-0"), cpu("b")])


# every rank gathers its own facts; the cases are run one after the other over one process group
RANK_FACTS = {
    "auto: a CPU peer": ("auto", [cuda("a", "GPU-0"), cpu("b")]),
    "auto: a GPU each on two hosts": ("auto", [cuda("a", "GPU-a"), cuda("b", "GPU-b")]),
    "auto: one GPU for both": ("auto", [cuda("a", "GPU-0"), cuda("a", "GPU-0")]),
    "nccl: a CPU peer": ("nccl", [cuda("a", "GPU-0"), cpu("b")]),
    "nccl: one GPU for both": ("nccl", [cuda("a", "GPU-0"), cuda("a", "GPU-0")]),
}


def _agree(rank, world, port, results):
    from pipeline.run.control import agree_backend

    init_gloo(rank, world, port)
    decided = {}
    for case, (requested, facts) in RANK_FACTS.items():
        try:
            decided[case] = agree_backend(requested, facts[rank])  # this rank knows only its own facts
        except ConfigError as exc:
            decided[case] = f"ConfigError: {exc}"
    results.put((rank, decided))


@pytest.mark.timeout(120)
def test_ranks_with_different_facts_agree_on_the_backend_or_fail_alike():
    first, second = run_ranks(_agree, 2, timeout=90)
    assert first == second
    assert first["auto: a CPU peer"] == "gloo" and first["auto: one GPU for both"] == "gloo"
    assert first["auto: a GPU each on two hosts"] == "nccl"
    assert first["nccl: a CPU peer"].startswith("ConfigError: --dist-backend nccl needs every stage on a GPU")
    assert first["nccl: one GPU for both"].startswith("ConfigError: --dist-backend nccl needs a GPU per stage")


SMALL = ["--dataset", "synthetic", "--synthetic-train-size", "64", "--synthetic-test-size", "32", "--batch-size", "32",
         "--num-hidden", "16", "--no-progress"]


@pytest.mark.parametrize("args,message", [
    (["--dist-backend", "mpi"], "unknown --dist-backend 'mpi'"),
    (["--dist-backend", "nccl"], "--dist-backend nccl needs --device cuda"),
    (["--stages", "2", "--transport", "zmq", "--dist-backend", "gloo"], "--dist-backend gloo applies to --transport dist only"),
])
def test_a_bad_dist_backend_exits_2_with_one_line(args, message, capsys):
    assert main(["train", *SMALL, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


class _Properties:
    def __init__(self, raw: bytes):
        self.uuid = type("Uuid", (), {"bytes": list(raw)})()


@pytest.mark.parametrize("raw,visible,name", [
    (bytes(range(1, 17)), "3", "GPU-01020304-0506-0708-090a-0b0c0d0e0f10"),  # the UUID, whatever the index
    (bytes(16), "3", "node/gpu3"),  # no UUID: the index before CUDA_VISIBLE_DEVICES renumbered it
    (bytes(16), "", "node/gpu0"),
])
def test_a_gpu_is_named_the_same_in_every_process_that_uses_it(monkeypatch, raw, visible, name):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: _Properties(raw))
    monkeypatch.setattr(socket, "gethostname", lambda: "node")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert physical_gpu(torch.device("cuda", 0)) == name
