"""The local launcher: start the K stage processes on this host (the emulation mode), watch them, end them together.

It plays torchrun's part for one host: a rendezvous store, one process per stage with its rank, and
supervision: when a stage fails, the others are stopped within seconds and the run exits non-zero, or, with
--max-restarts N, all stages start again from the newest complete checkpoint (as torchrun --max-restarts does).
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

from pipeline.persistence.checkpoint import verify_checkpoint
from pipeline.config import Config, ConfigError
from pipeline.data import check_available
from pipeline.run.interrupt import ABORT_AFTER_S, STOP_SIGNALS
from pipeline.run.resources import check_machine
from pipeline.run.restarts import EXIT_STOPPED, RESTART_ENV, record_start, resolve_resume
from pipeline.run.plan import RunPlan, make_plan
from pipeline.run.runtime import gradient_links, guarded, run_stage
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


def stage_process(plan: RunPlan, rank: int, world: int, store_port: int, queues: dict | None, parent: int,
                  number: int = 0) -> None:
    """Body of one stage process started by the launcher, in its attempt `number` (0, then 1 after a restart...)."""
    _die_with_parent(parent)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store_port), **{RESTART_ENV: str(number)})
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False)  # run_stage meets under this attempt's prefix
    sys.exit(guarded(rank, lambda: run_stage(plan.cfg, rank, world, rank, world, plan=plan, store=store,
                                             local_queues=queues)))


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
    """Wait for all stages; at the first failure stop the rest and return its exit code (1, or 2 for bad config).
    A run stopped early by a signal, its checkpoint written, returns EXIT_STOPPED."""
    pending = {process.sentinel: process for process in processes}
    stopped = False
    try:
        while pending:
            for sentinel in multiprocessing.connection.wait(list(pending), timeout=1.0):
                process = pending.pop(sentinel)
                process.join()
                if process.exitcode == EXIT_STOPPED:
                    stopped = True
                    continue
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
    return EXIT_STOPPED if stopped else 0


def preflight(cfg: Config) -> RunPlan:
    """Everything about a run that can be judged before its processes start, and the plan of its first attempt;
    a ConfigError otherwise."""
    check_machine(cfg)  # a GPU, the precision, TensorBoard, the key files
    plan = make_plan(cfg)  # the factory imports and builds a network that fits the stages
    check_available(cfg.data)  # a missing dataset is reported here, once
    if cfg.run.resume:
        verify_checkpoint(cfg.run.checkpoint_dir, cfg, plan.network)
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
    return plan


def launch(cfg: Config) -> int:
    """Run a K-stage pipeline on this host; returns the exit code. After a failure the stages are started again, up
    to --max-restarts times, each time from the newest complete checkpoint (pipeline/run/restarts.py)."""
    given = cfg
    cfg = resolve_resume(given, 0)
    plan = preflight(cfg)
    record_start(cfg, 0)
    store = dist.TCPStore("127.0.0.1", cfg.pipeline.master_port, is_master=True, wait_for_workers=False)
    processes: list = []
    forward = _forwarder(processes)
    handlers = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        number = 0
        while True:
            started, queues = _start(plan, store.port, number)  # the queues live until the attempt ends
            processes[:] = started
            if forward.signalled:  # it came while the stages were being restarted: it is theirs
                forward.resend()
            code = supervise(processes, cfg.run.device)
            del queues
            if code in (0, 2, EXIT_STOPPED) or forward.signalled or number >= cfg.run.max_restarts:
                return code
            number += 1
            print(f"restart {number} of {cfg.run.max_restarts}", file=sys.stderr, flush=True)
            cfg = resolve_resume(given, number)
            plan = make_plan(cfg)  # this attempt's: what it resumes from, its token
            record_start(cfg, number)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _start(plan: RunPlan, store_port: int, number: int) -> tuple[list, dict | None]:
    """Start the K stage processes of attempt `number`; returns them and the local transport's queues, which the
    launcher must keep until they end (a queue freed here takes its semaphores with it before a child opens them)."""
    cfg = plan.cfg
    world = cfg.pipeline.stages
    context = mp.get_context("spawn")
    queues = None
    if cfg.pipeline.transport == "local":
        queues = make_queues(context, world, cfg.pipeline.queue_depth, gradient_links(cfg, plan.placement, world))
    processes = [context.Process(target=stage_process, args=(plan, rank, world, store_port, queues, os.getpid(), number),
                                 name=f"stage {rank}", daemon=False) for rank in range(world)]
    for process in processes:
        process.start()
    return processes, queues


def _forwarder(processes: list):
    """Signal handler of the launcher: pass the first SIGINT/SIGTERM/SIGUSR1 on to every stage (which checkpoint and
    stop cleanly, and are not restarted); a repeat after ABORT_AFTER_S aborts them (a terminal's Ctrl-C reaches the
    stages directly, too)."""
    first: list[float] = []

    def handle(signum: int, frame) -> None:
        now = time.monotonic()
        if not first:
            first.append(now)
            handle.signalled = signum
            handle.resend()
        elif now - first[0] > ABORT_AFTER_S:
            raise KeyboardInterrupt

    def resend() -> None:
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, handle.signalled)

    handle.signalled, handle.resend = 0, resend
    return handle
