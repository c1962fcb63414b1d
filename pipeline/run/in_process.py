"""Every stage of a run as a thread of this process, over in-memory queues: the fast emulation the test tier uses.

The stages are the real Stage objects, with the schedule, roles, threads and queues of a multi-process run;
only the channels differ (pipeline/transport/local.py: ThreadQueue, a private copy of every tensor sent) and
what processes agree on over their control group (pipeline/run/runtime.py) holds by construction: one process
builds the network, chooses the placement and picks the checkpoint once. Blocks are built one stage after the
other before any thread starts, and whatever reseeds the process's generators (building blocks: the last stage's
copy for --log-alignment) or lends them a block's state (a block's forward) holds them alone while it does
(pipeline/model/seeding.py: GLOBAL_GENERATORS). All stages share the process's
intra-op threads (torch.set_num_threads is global): a run is bit-identical to a multi-process one where both use
one thread per stage, as the equivalence tests do.
"""

from __future__ import annotations

import dataclasses

import threading
import time

import torch

from pipeline.config import Config
from pipeline.run.determinism import use_deterministic
from pipeline.run.faults import Hooks
from pipeline.run.launcher import preflight
from pipeline.run.plan import RunPlan
from pipeline.run.restarts import record_start, resolve_resume
from pipeline.run.runtime import choose_placement, gradient_links, make_stage, stage_blocks
from pipeline.engine.stage import Stage
from pipeline.transport.local import ThreadQueues, make_queues, open_local


class StageFailed(RuntimeError):
    """A stage thread raised: the first failure, with the stage named; `failures` holds every stage's (rank,
    exception), in the order they came."""

    def __init__(self, message: str, failures: list[tuple[int, BaseException]] | None = None):
        super().__init__(message)
        self.failures = failures or []


def run_in_process(cfg: Config, hooks: Hooks = Hooks(), timeout: float = 300.0) -> dict | None:
    """Run the pipeline `cfg` describes with its K stages as threads here, with the faults or stop `hooks` inject;
    returns the last stage's summary. Raises StageFailed with the first stage's exception as its cause when a
    stage fails."""
    cfg = resolve_resume(cfg, 0)
    plan = preflight(cfg)  # as the launcher judges a run before its processes start, and plans it
    record_start(cfg, 0)
    world, device = cfg.pipeline.stages, torch.device("cuda" if cfg.run.device == "cuda" else "cpu")
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    use_deterministic(cfg.run.deterministic)
    torch.set_num_threads(cfg.run.threads or 1)  # the process's: every stage's (and given back after)
    try:
        return _run(plan, hooks, timeout, world, device)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _run(plan: RunPlan, hooks: Hooks, timeout: float, world: int, device: torch.device) -> dict | None:
    cfg = plan.cfg
    placement, profile = choose_placement(plan, world, device)
    abort = threading.Event()
    hooks = dataclasses.replace(hooks, release=abort)  # an injected hang ends with the run (pipeline/run/faults.py)
    queues = make_queues(ThreadQueues(abort), world, cfg.pipeline.queue_depth, gradient_links(cfg, placement))
    stages = []
    for rank in range(world):
        links = open_local(rank, world, device, queues, gradient_links(cfg, placement))
        stop = threading.Event()  # no signal handler sets it here (the process's are its caller's)
        stage = make_stage(plan, rank, world, placement, stage_blocks(plan, rank, placement, device), links, device,
                           stop, hooks)
        if profile and rank == 0:
            stage.notes["partition_profile"] = profile
        stage.notes.update(dist_backend=None, deterministic=torch.are_deterministic_algorithms_enabled())
        stages.append(stage)
    return _run_threads(stages, abort, timeout)


def _run_threads(stages: list[Stage], abort: threading.Event, timeout: float, grace: float = 10.0) -> dict | None:
    """Run the stages' threads; once one fails, the others get `grace` seconds to end (their waits on it give up:
    ThreadQueue) before the failure is raised; a stage that is still waiting then is left behind (a daemon)."""
    results: dict[int, dict | None] = {}
    failures: list[tuple[int, BaseException]] = []
    failed_at: list[float] = []

    def body(stage: Stage) -> None:
        try:
            results[stage.rank] = stage.run()
        except BaseException as exc:  # noqa: BLE001 (carried to the caller)
            failures.append((stage.rank, exc))
            failed_at.append(time.monotonic())
            abort.set()  # the other stages' waits on this one give up (ThreadQueue)

    threads = [threading.Thread(target=body, args=(s,), name=f"stage {s.rank}", daemon=True) for s in stages]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    while any(t.is_alive() for t in threads):
        if time.monotonic() > deadline:
            abort.set()
            failures.append((-1, TimeoutError(f"the stages did not end within {timeout:g} s")))
            break
        if failed_at and time.monotonic() > failed_at[0] + grace:
            break
        next(t for t in threads if t.is_alive()).join(0.1)
    if failures:
        rank, exc = failures[0]
        raise StageFailed(f"stage {rank} failed: {type(exc).__name__}: {exc}", list(failures)) from exc
    return results[stages[-1].rank]
