"""Transport benchmark: MB/s and latency per message of our channels next to the raw libraries, in one run.

    python benchmarks/transport.py --out benchmarks/results/transport [--quick]

Two processes, each pinned to its own core. For every message size (64 KB to 64 MB of float32):
  * stream: the sender sends N messages back to back; the receiver's rate between its first and last message
    gives MB/s (and ms per message);
  * ping-pong: one message there and back, repeated; half the median round trip is the latency.
Contenders: our dist (gloo), zmq over ipc and over tcp, and local (torch.multiprocessing) channels, each with
its header, checks and receive buffers; and the raw libraries moving the same bytes: torch.distributed
send/recv into a preallocated tensor; pyzmq PUSH/PULL with zero-copy send, receiving either in libzmq's buffer
(no copy) or with recv_into a preallocated aligned tensor (one copy, like ours); a multiprocessing queue putting
the same tensor each time (after the first put only a handle to its shared storage travels: an upper bound,
where ours copies every message into fresh shared memory).
Ours and the raw baselines take turns, --repeats times per size, and medians are reported (the machine drifts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
QUICK_SIZES = [64 << 10, 1 << 20, 16 << 20]
# each of our channels and the raw baselines measured in turn with it; "-into" receives into a preallocated
# 64-byte-aligned tensor (one copy, as our zmq receiver does), the others use libzmq's buffer in place
RAW = {"dist": ["raw-dist"], "zmq-ipc": ["raw-zmq-ipc", "raw-zmq-ipc-into"], "zmq-tcp": ["raw-zmq-tcp", "raw-zmq-tcp-into"],
       "local": ["raw-local"]}
OURS = list(RAW)


def _messages(size: int, budget: int) -> int:
    return max(8, min(2000, budget // size))


class _Ours:
    """Our channels: `forward` rank 0 -> 1, `back` rank 1 -> 0."""

    def __init__(self, kind: str, rank: int, store, queues):
        from pipeline.transport.message import Kind, Message

        self.Kind, self.Message = Kind, Message
        cpu = torch.device("cpu")
        if kind == "dist":
            from pipeline.transport.dist import DistChannel

            forward, back = dist.new_group([0, 1]), dist.new_group([0, 1])
            self.out = DistChannel(1 - rank, forward if rank == 0 else back, cpu, cpu)
            self.inp = DistChannel(1 - rank, back if rank == 0 else forward, cpu, cpu)
        elif kind.startswith("zmq"):
            from pipeline.transport.zmq import ZmqReceiver, ZmqSender

            bind = f"ipc://{tempfile.mkdtemp(prefix='localpipe-bench-')}/inbox" if kind.endswith("ipc") else "tcp://127.0.0.1"
            self.inp = ZmqReceiver(bind, cpu)
            store.set(f"{kind}-{rank}", self.inp.address)
            self.out = ZmqSender(store.get(f"{kind}-{1 - rank}").decode())
        else:
            from pipeline.transport.local import QueueChannel

            self.out = QueueChannel(queues[rank], cpu)
            self.inp = QueueChannel(queues[1 - rank], cpu)

    def send(self, tensor: torch.Tensor) -> None:
        self.out.send(self.Message(self.Kind.TRAIN, 1, 0, [tensor]))

    def recv(self) -> None:
        self.inp.recv().release()


class _Raw:
    """The libraries alone, moving the same bytes."""

    def __init__(self, kind: str, rank: int, store, queues, size: int):
        self.kind = kind
        self.buffer = torch.empty(size // 4)
        if kind == "raw-dist":
            self.peer = 1 - rank
        elif kind.startswith("raw-zmq"):
            import zmq

            context = zmq.Context.instance()
            self.pull = context.socket(zmq.PULL)
            self.pull.setsockopt(zmq.RCVHWM, 1)
            if "-ipc" in kind:
                address = f"ipc://{tempfile.mkdtemp(prefix='localpipe-bench-')}/raw"
                self.pull.bind(address)
            else:
                address = f"tcp://127.0.0.1:{self.pull.bind_to_random_port('tcp://127.0.0.1')}"
            store.set(f"{kind}-{size}-{rank}", address)
            self.push = context.socket(zmq.PUSH)
            self.push.setsockopt(zmq.SNDHWM, 1)
            self.push.connect(store.get(f"{kind}-{size}-{1 - rank}").decode())
        else:
            self.out, self.inp = queues[rank], queues[1 - rank]

    def send(self, tensor: torch.Tensor) -> None:
        if self.kind == "raw-dist":
            dist.send(tensor, self.peer)
        elif self.kind.startswith("raw-zmq"):
            self.push.send(memoryview(tensor.numpy()), copy=False, track=True).wait()
        else:
            self.out.put(tensor)

    def recv(self) -> None:
        if self.kind == "raw-dist":
            dist.recv(self.buffer, self.peer)
        elif self.kind.endswith("-into"):
            self.pull.recv_into(self.buffer.view(torch.uint8).numpy())
        elif self.kind.startswith("raw-zmq"):
            self.pull.recv(copy=False)
        else:
            self.inp.get()


def _stream(link, rank: int, payload: torch.Tensor, n: int) -> float | None:
    """Rank 0 sends n messages back to back; rank 1 returns its MB/s between the first and the last."""
    dist.barrier()
    if rank == 0:
        for _ in range(n):
            link.send(payload)
        return None
    link.recv()
    started = time.perf_counter()
    for _ in range(n - 1):
        link.recv()
    return (n - 1) * payload.numel() * 4 / (time.perf_counter() - started) / 1e6


def _ping_pong(link, rank: int, payload: torch.Tensor, rounds: int) -> float | None:
    """Half the median round trip (rank 0), in ms."""
    dist.barrier()
    trips = []
    for _ in range(rounds):
        if rank == 0:
            started = time.perf_counter()
            link.send(payload)
            link.recv()
            trips.append(time.perf_counter() - started)
        else:
            link.recv()
            link.send(payload)
    return 1e3 * statistics.median(trips) / 2 if rank == 0 else None


def _worker(rank: int, port: int, kind: str, sizes: list[int], budget: int, repeats: int, queues, results) -> None:
    """Our channel of `kind` and the raw library, measured in turns (so that drift hits both alike)."""
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, [cores[rank % len(cores)]])
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    ours = _Ours(kind, rank, store, queues["ours"])
    rows: dict[str, list] = {name: [] for name in (kind, *RAW[kind])}
    for size in sizes:
        links = {kind: ours, **{raw: _Raw(raw, rank, store, queues["raw"], size) for raw in RAW[kind]}}
        payload = torch.ones(size // 4)
        n = _messages(size, budget)
        rates: dict[str, list] = {name: [] for name in links}
        latencies: dict[str, list] = {name: [] for name in links}
        for _ in range(repeats):
            for name, link in links.items():
                rates[name].append(_stream(link, rank, payload, n))
                latencies[name].append(_ping_pong(link, rank, payload, max(5, n // 8)))
        for name in rows:
            values = rates[name] if rank == 1 else latencies[name]
            key = "mb_per_s" if rank == 1 else "latency_ms"
            rows[name].append({"bytes": size, "messages": n, key: statistics.median(values), key + "_runs": values})
        dist.barrier()
    results.put((rank, rows))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # sockets and queues of every size are still open: leave without a teardown


def measure(kind: str, sizes: list[int], budget: int, repeats: int) -> dict[str, list[dict]]:
    """{kind: rows, raw-kind: rows}, one row per size: median MB/s and latency of `repeats` turns."""
    context = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    queues = {"ours": [context.Queue(maxsize=1), context.Queue(maxsize=1)],
              "raw": [context.Queue(maxsize=1), context.Queue(maxsize=1)]} if kind == "local" else {"ours": None, "raw": None}
    results = context.Queue()
    processes = [context.Process(target=_worker, args=(rank, store.port, kind, sizes, budget, repeats, queues, results))
                 for rank in (0, 1)]
    for process in processes:
        process.start()
    rows = dict(results.get(timeout=1800) for _ in processes)
    for process in processes:
        process.join(timeout=30)
    return {name: [{**stream, **ping} for stream, ping in zip(rows[1][name], rows[0][name])] for name in rows[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/transport")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5, help="turns of ours and raw per size; medians reported")
    parser.add_argument("--only", default=",".join(OURS), help=f"comma-separated subset of {','.join(OURS)}")
    args = parser.parse_args()
    ours = [kind for kind in args.only.split(",") if kind in RAW]
    contenders = [name for kind in ours for name in (kind, *RAW[kind])]
    sizes = QUICK_SIZES if args.quick else SIZES
    budget = (64 if args.quick else 256) << 20  # bytes streamed per size and turn
    results = {}
    for kind in ours:
        results.update(measure(kind, sizes, budget, args.repeats))
        print(f"  {kind} done", file=sys.stderr, flush=True)
    print("| size | " + " | ".join(contenders) + " |  (MB/s; latency ms)")
    print("|---|" + "---|" * len(contenders))
    for i, size in enumerate(sizes):
        cells = [f"{results[k][i]['mb_per_s']:.0f}; {results[k][i]['latency_ms']:.2f}" for k in contenders]
        print(f"| {size >> 10} KB | " + " | ".join(cells) + " |")
    ratios = {f"{kind} / {raw}": [results[kind][i]["mb_per_s"] / results[raw][i]["mb_per_s"] for i in range(len(sizes))]
              for kind in ours for raw in RAW[kind]}
    print("\nours / raw MB/s, per size:")
    for pair, values in ratios.items():
        print(f"  {pair}: " + " ".join(f"{r:.2f}" for r in values))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "transport.json"), "w") as f:
        json.dump({"sizes": sizes, "repeats": args.repeats, "budget_bytes": budget, "results": results,
                   "ours_over_raw": ratios}, f, indent=1)
    plot(sizes, results, os.path.join(args.out, "transport.png"))


def plot(sizes, results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate, latency) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, rows in results.items():
        style = "--" if kind.startswith("raw") else "-"
        rate.plot(sizes, [r["mb_per_s"] for r in rows], style, marker=".", label=kind)
        latency.plot(sizes, [r["latency_ms"] for r in rows], style, marker=".", label=kind)
    rate.set(xscale="log", xlabel="message bytes", ylabel="MB/s", title="throughput (dashed: raw library)")
    latency.set(xscale="log", yscale="log", xlabel="message bytes", ylabel="ms", title="latency (half a round trip)")
    rate.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
