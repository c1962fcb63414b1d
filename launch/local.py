"""Local launcher: start the K stage processes on this host (the emulation mode), watch them, end them together.

It plays torchrun's part for one host: a rendezvous store, one process per stage with its rank, and
supervision: when a stage fails, the others are stopped within seconds and the run exits non-zero.
"""

from __future__ import annotations

import ctypes
import multiprocessing.connection
import os
import signal
import socket
import sys
import time

import torch.distributed as dist
import torch.multiprocessing as mp

import zmq

from pipeline.checkpoint import verify_checkpoint
from pipeline.config import Config, ConfigError
from pipeline.data import check_available
from pipeline.factories import check_network
from pipeline.interrupt import ABORT_AFTER_S
from pipeline.runtime import gradient_links, guarded, run_stage
from pipeline.transport.local import make_queues

STOP_GRACE_S = 3.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Linux: this stage gets SIGKILL if the launcher dies, so no stage outlives a killed launcher."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        return
    if os.getppid() != parent:
        os._exit(1)


def stage_process(cfg: Config, rank: int, world: int, store_port: int, queues: dict | None, parent: int) -> None:
    """Body of one stage process started by the launcher."""
    _die_with_parent(parent)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store_port))
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False)
    sys.exit(guarded(rank, lambda: run_stage(cfg, rank, world, rank, world, store=store, local_queues=queues)))


def _stop(processes: list, terminate: bool = True) -> None:
    """Stop the stages still running: SIGTERM, then SIGKILL after STOP_GRACE_S. Without `terminate` (a stage refused
    the configuration at start-up), the others get STOP_GRACE_S to end on their own first: they often met the same
    error, which stage 0 reports; nothing was trained yet, so nothing needs saving."""
    if terminate:
        for process in processes:
            if process.is_alive():
                process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _cause(exitcode: int) -> str:
    if exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (the kernel's out-of-memory killer sends this too)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {exitcode}" + ("" if exitcode == 1 else " (bad configuration)" if exitcode == 2 else "")


def supervise(processes: list, device: str = "cpu") -> int:
    """Wait for all stages; at the first failure stop the rest and return its exit code (1, or 2 for bad config)."""
    pending = {process.sentinel: process for process in processes}
    try:
        while pending:
            for sentinel in multiprocessing.connection.wait(list(pending), timeout=1.0):
                process = pending.pop(sentinel)
                process.join()
                if process.exitcode == 2:  # a bad configuration, found at start-up: the stage has said why
                    _stop(list(pending.values()), terminate=False)
                    return 2
                if process.exitcode != 0:
                    _stop(list(pending.values()))
                    print(f"error: {process.name} (pid {process.pid} on {socket.gethostname()}, {device}) "
                          f"{_cause(process.exitcode)}; stopped the other stages", file=sys.stderr, flush=True)
                    return 1
    except KeyboardInterrupt:
        _stop(list(pending.values()))
        raise
    return 0


def preflight(cfg: Config) -> None:
    """Everything about a run that can be judged before its processes start; a ConfigError otherwise."""
    check_network(cfg)  # the factory imports and builds a network that fits the stages
    check_available(cfg.data)  # a missing dataset is reported here, once
    if cfg.run.resume:
        verify_checkpoint(cfg.run.checkpoint_dir, cfg)
    if cfg.pipeline.master_port:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", cfg.pipeline.master_port))
            except OSError:
                raise ConfigError(f"address 127.0.0.1:{cfg.pipeline.master_port} is in use: pick another --master-port "
                                  f"(0 takes any free port)") from None
    if cfg.pipeline.transport == "zmq" and cfg.pipeline.zmq_host not in ("127.0.0.1", "localhost"):
        context = zmq.Context.instance()
        probe = context.socket(zmq.PULL)
        try:
            probe.bind_to_random_port(f"tcp://{cfg.pipeline.zmq_host}")
        except zmq.ZMQError as exc:
            raise ConfigError(f"--zmq-host {cfg.pipeline.zmq_host} cannot be bound on this machine ({exc}): "
                              f"give one of its addresses, or 0.0.0.0") from None
        finally:
            probe.close(linger=0)


def launch(cfg: Config) -> int:
    """Run a K-stage pipeline on this host; returns the exit code."""
    preflight(cfg)
    world = cfg.pipeline.stages
    context = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", cfg.pipeline.master_port, is_master=True, wait_for_workers=False)
    queues = None
    if cfg.pipeline.transport == "local":
        queues = make_queues(context, world, cfg.pipeline.queue_depth, gradient_links(cfg, None, world))
    processes = [context.Process(target=stage_process, args=(cfg, rank, world, store.port, queues, os.getpid()),
                                 name=f"stage {rank}", daemon=False) for rank in range(world)]
    for process in processes:
        process.start()
    handlers = {sig: signal.signal(sig, _forwarder(processes)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return supervise(processes, cfg.run.device)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _forwarder(processes: list):
    """Signal handler of the launcher: pass the first SIGINT/SIGTERM on to every stage (which checkpoint and stop
    cleanly); a repeat after ABORT_AFTER_S aborts them (a terminal's Ctrl-C reaches the stages directly, too)."""
    first: list[float] = []

    def handle(signum: int, frame) -> None:
        now = time.monotonic()
        if not first:
            first.append(now)
            for process in processes:
                if process.is_alive():
                    os.kill(process.pid, signum)
        elif now - first[0] > ABORT_AFTER_S:
            raise KeyboardInterrupt

    return handle
