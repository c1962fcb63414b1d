"""Control group: what the ranks tell each other over the default (gloo) process group before the data links open.

Every rank states facts about itself (its host, its device, which physical GPU), the facts are gathered, and a
pure function of all of them decides what all ranks must agree on, such as the data backend. Deciding on the
gathered facts, never on what one process sees, is what keeps the ranks from disagreeing: a rank that chose
NCCL while its peer chose gloo would wait on the link forever.
"""

from __future__ import annotations

import json
import os
import socket
import uuid

import torch
import torch.distributed as dist

from pipeline.errors import AgreedError

HOST_ENV = "PIPELINE_HOST_NAME"


def host_name() -> str:
    """The name by which the ranks tell machines apart (zmq links within a host use ipc://, across hosts tcp://;
    NCCL needs distinct GPUs per host): $PIPELINE_HOST_NAME if set, else the hostname. Set it where hostnames are
    not unique (containers on several machines that share one), or to emulate several nodes on one machine."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def exchange_strings(value: str) -> list[str]:
    """Every rank's `value`, gathered over the default (control) process group: their lengths first, then the
    strings as byte tensors padded to the longest."""
    data = torch.tensor(list(value.encode()), dtype=torch.uint8)
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(lengths, torch.tensor([len(data)]))
    longest = max(int(n) for n in lengths)
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[:len(data)] = data
    gathered = [torch.zeros_like(mine) for _ in lengths]
    dist.all_gather(gathered, mine)
    return [bytes(t[:int(n)].tolist()).decode() for t, n in zip(gathered, lengths)]


def physical_gpu(device: torch.device) -> str:
    """A name of the physical GPU behind `device` that is the same in every process that uses it: its UUID, or,
    where the driver gives none, the host and the index before CUDA_VISIBLE_DEVICES renumbered it (so that
    processes that each see one GPU as cuda:0 are still told apart)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    raw = bytes(getattr(getattr(torch.cuda.get_device_properties(index), "uuid", None), "bytes", b""))
    if len(raw) == 16 and any(raw):
        return f"GPU-{uuid.UUID(bytes=raw)}"
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return f"{host_name()}/gpu{visible[index] if index < len(visible) else index}"


def device_facts(device: torch.device) -> dict:
    """What the data backend depends on about this rank: host, device type and, on CUDA, the physical GPU."""
    facts = {"host": host_name(), "device": device.type}
    if device.type == "cuda":
        facts["gpu"] = physical_gpu(device)
    return facts


def choose_backend(requested: str, facts: list[dict]) -> str:
    """The data backend of the whole run from every rank's device_facts (rank order): NCCL iff every rank is on
    CUDA and no two share a physical GPU (NCCL cannot connect two ranks on one device), gloo otherwise. An
    explicit "nccl" that cannot work is a ConfigError; every rank raises the same one, as all decide on the
    same facts."""
    off_gpu = [rank for rank, f in enumerate(facts) if f["device"] != "cuda"]
    sharing: dict[str, list[int]] = {}
    for rank, f in enumerate(facts):
        if f["device"] == "cuda":
            sharing.setdefault(f["gpu"], []).append(rank)
    shared = {gpu: ranks for gpu, ranks in sharing.items() if len(ranks) > 1}
    if requested == "gloo" or (requested == "auto" and (off_gpu or shared)):
        return "gloo"
    if off_gpu:
        where = ", ".join(f"stage {r} on {facts[r]['device']} ({facts[r]['host']})" for r in off_gpu)
        raise AgreedError(f"--dist-backend nccl needs every stage on a GPU, but {where}: use --dist-backend auto or gloo")
    if shared:
        gpu, ranks = next(iter(shared.items()))
        raise AgreedError(f"--dist-backend nccl needs a GPU per stage, but stages {', '.join(map(str, ranks))} share "
                          f"{gpu} on {facts[ranks[0]]['host']}: use --dist-backend auto or gloo, or one GPU per stage")
    return "nccl"


def agree_backend(requested: str, mine: dict) -> str:
    """Gather every rank's facts and decide the data backend, the same on every rank (collective)."""
    return choose_backend(requested, [json.loads(text) for text in exchange_strings(json.dumps(mine))])
