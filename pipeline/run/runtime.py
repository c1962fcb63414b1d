"""Runtime: turn one process into stage `rank` (device, threads, cores, process group, links) and run it.

The same function runs under torchrun (rendezvous from the environment) and under the local launcher
(rendezvous through the launcher's TCPStore). A failing stage prints who and where it is with its traceback
and exits non-zero at once, without a collective teardown that could wait on a dead peer.
"""

from __future__ import annotations

import ctypes
import datetime
import glob
import json
import os
import socket
import sys
import threading
import traceback

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.block.blocks import NonFiniteLoss
from pipeline.persistence.checkpoint import latest_checkpoint, load_stage_checkpoint, restore_stage, verify_checkpoint
from pipeline.config import Config, ConfigError
from pipeline.run.control import agree_backend, device_facts, exchange_strings
from pipeline.errors import AgreedError
from pipeline.data import BatchSource
from pipeline.run.determinism import use_deterministic
from pipeline.run.faults import Hooks
from pipeline.run.interrupt import StopRequest
from pipeline.model.dry_run import block_structure, blocks_unlike_plan
from pipeline.model.factories import build_blocks, initial_checksums, make_network, weights_checksum
from pipeline.run.plan import RunPlan, share_plan
from pipeline.engine.partition import Placement, as_sizes, balanced_partition, balanced_placement, resolve_placement, stage_times
from pipeline.engine.profile import block_costs, send_path
from pipeline.run.restarts import EXIT_STOPPED, attempt
from pipeline.engine.stage import Stage, StallError
from pipeline.transport import dfa_gradient_links, open_links
from pipeline.transport.base import PeerGone



def name_process(rank: int) -> None:
    """Linux: call this process "stage-<rank>" (what ps, top and /proc/<pid>/comm show)."""
    try:
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_NAME, f"stage-{rank}".encode()[:15])
    except OSError:
        pass


_PR_SET_NAME = 15


def stage_processes(parent: int) -> dict[int, int]:
    """Linux: rank -> pid of the children of `parent` that name_process called stage-<rank>."""
    found = {}
    for path in glob.glob("/proc/[0-9]*/comm"):
        pid = int(path.split("/")[2])
        try:
            with open(path) as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if name.startswith("stage-") and ppid == parent:
            found[int(name[len("stage-"):])] = pid
    return found


def stage_device(cfg: Config, local_rank: int) -> torch.device:
    """cuda:<local rank> when there are enough GPUs, else the visible GPUs in turn (all stages on cuda:0 in the
    one-GPU emulation), or the CPU. A process that sees one GPU (SLURM --gpus-per-task=1, or CUDA_VISIBLE_DEVICES
    set per rank) uses it as cuda:0, whatever its local rank; whether stages share a GPU is judged on the GPUs'
    UUIDs (pipeline/run/control.py), not on these indices."""
    if cfg.run.device == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def pin_cores(local_rank: int, local_world: int) -> int:
    """Pin this stage to its own share of the cores and return how many it got (its thread count).

    With more stages than cores nothing is pinned and each stage gets one thread: doubling stages up round
    robin would fix an unlucky pairing for the whole run (two heavy stages on one core, a light one alone on
    the other), while unpinned stages go to whichever core is idle.
    """
    cores = sorted(os.sched_getaffinity(0))
    per_stage = len(cores) // local_world
    if per_stage:
        os.sched_setaffinity(0, cores[local_rank * per_stage:(local_rank + 1) * per_stage])
    return max(1, per_stage)


def run_stage(cfg: Config, rank: int, world: int, local_rank: int, local_world: int, *, plan: RunPlan | None = None,
              store: dist.Store | None = None, local_queues: dict | None = None) -> int:
    """Set up and run stage `rank` of the attempt `plan` describes (None, under torchrun: rank 0 makes it from its
    `cfg` and sends it); returns its exit code: 0, or EXIT_STOPPED when a signal stopped the run early."""
    name_process(rank)
    use_deterministic(cfg.run.deterministic)  # before anything touches the GPU (see pipeline/run/determinism.py)
    stop = StopRequest(announce=rank == 0).install()  # stage 0 turns it into a checkpoint and END; the others wait
    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock: a killed stage would leak it
    device = stage_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        threads = cfg.run.threads or 1
    else:
        # an explicit --threads leaves the placement to the user (or to taskset)
        threads = cfg.run.threads or pin_cores(local_rank, local_world)
    torch.set_num_threads(threads)
    # collectives and gloo receives give up like the stages do, not after torch's 30-minute default
    timeout = datetime.timedelta(seconds=max(60.0, cfg.pipeline.stall_timeout))
    dist.init_process_group("gloo", store=attempt_store(store, rank, world, timeout), rank=rank, world_size=world,
                            timeout=timeout)
    # every rank takes part, and all decide on every rank's facts: the same backend everywhere, or the same error
    backend = agree_backend(cfg.pipeline.dist_backend, device_facts(device)) if cfg.pipeline.transport == "dist" else None
    seen = agree_resume(cfg)  # what this rank sees (under torchrun each rank resolved --auto-resume alone)
    plan = plan or share_plan(cfg, rank)
    cfg = plan.cfg
    if seen != plan.resume_from:  # every rank sees the same folder (agreed above): all refuse alike
        raise AgreedError(f"the stages see checkpoint {seen} but the run was planned to resume from {plan.resume_from}: "
                          f"was a checkpoint written or removed while the run started?")
    placement, profile = agree_partition(plan, rank, world, device, send_path(device, cfg.pipeline.transport, backend))
    blocks = agreed_blocks(plan, rank, world, placement, device)
    links = open_links(cfg.pipeline.transport, rank, world, device, gradients=gradient_links(cfg, placement),
                       dist_backend=backend or "gloo", zmq_host=cfg.pipeline.zmq_host,
                       zmq_curve_keys=cfg.pipeline.zmq_curve_keys, local_queues=local_queues, timeout=timeout)
    stage = make_stage(plan, rank, world, placement, blocks, links, device, stop.event, Hooks.from_env())
    if profile:
        stage.notes["partition_profile"] = profile
    stage.notes.update(dist_backend=backend, deterministic=torch.are_deterministic_algorithms_enabled())
    stage.run()
    try:
        dist.barrier()  # every stage has seen END: the links can close
    except RuntimeError as exc:  # gloo: "Connection closed by peer"; a peer failed after this stage was done
        raise PeerGone(f"a peer left before the end of the run ({type(exc).__name__} in the final barrier)") from None
    links.close()
    dist.destroy_process_group()
    return EXIT_STOPPED if stage.stopped_at else 0


def stage_blocks(plan: RunPlan, rank: int, placement: Placement, device: torch.device,
                 resolved: tuple | None = None) -> list:
    """The blocks stage `rank` trains, built from the run's seed and the plan's shapes (a split block: both halves,
    each stepping its own); `resolved`: the factory's network and context, where the caller has called it."""
    return build_blocks(plan.cfg, plan.input_shape, plan.num_classes, device=device, placement=placement, rank=rank,
                        shape=plan.shape, resolved=resolved)


def make_stage(plan: RunPlan, rank: int, world: int, placement: Placement, blocks: list, links, device: torch.device,
               stop: threading.Event | None, hooks: Hooks) -> Stage:
    """Stage `rank` on its blocks and links, restored from the plan's checkpoint when the attempt resumes."""
    cfg, start = plan.cfg, None
    if plan.resume_from is not None:
        folder, manifest = verify_checkpoint(cfg.run.checkpoint_dir, cfg, plan.network)
        restore_stage(blocks, load_stage_checkpoint(folder, rank))
        start = manifest["position"]
    source = BatchSource(cfg.data, cfg.run.seed, device) if rank == 0 else None
    return Stage(cfg, rank, world, blocks, placement, links=links, source=source, device=device,
                 host=socket.gethostname(), start=start, stop=stop, token=plan.token, hooks=hooks, network=plan.network)


def attempt_store(store: dist.Store | None, rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store of this attempt of the run: the launcher's, or torchrun's (env://), under a prefix of its
    own. A restarted worker group meets in the same store as the group before it, and without the prefix the new
    ranks would read the dead ranks' gloo addresses and fail to connect ("connectFullMesh failed")."""
    if store is None:
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
    return dist.PrefixStore(f"attempt-{attempt()}/", store)


def agree_resume(cfg: Config) -> str | None:
    """Every rank resumes from the same checkpoint or none does (collective): under torchrun each rank decided alone
    (--auto-resume, a restart) from what it sees of the checkpoint folder, and a folder that is not shared, or a
    manifest not yet visible on some node, is refused on every rank. Returns the folder."""
    folder = latest_checkpoint(cfg.run.checkpoint_dir)[0] if cfg.run.resume else None
    folders = [json.loads(text) for text in exchange_strings(json.dumps(folder))]
    if len(set(folders)) > 1:
        raise AgreedError(f"the stages do not see the same checkpoint to resume from ({', '.join(map(str, folders))}, "
                          f"by rank): --checkpoint-dir must be one folder every node shares")
    return folder


def agreed_blocks(plan: RunPlan, rank: int, world: int, placement: Placement, device: torch.device) -> list:
    """Stage `rank`'s blocks, each the plan's and starting from the same weights in every process (collective).

    The factory and each block are built under seeds derived from the run's alone, which covers torch's, Python's
    and numpy's global generators; what they cannot cover (a factory that reads an environment variable or a file
    that differs between ranks, or seeds from the process id) is caught here. Each stage builds its blocks and the
    next stage's, dry-runs just those on the meta device and compares them with the plan's dry run (shapes,
    parameters, structure), and compares their weights with the other ranks' builds. A difference, or a build
    that fails, is refused on every rank alike: no rank raises before the exchange while the others wait in it."""
    cfg, blocks, problem, odd, mine = plan.cfg, [], None, False, []
    try:
        network, ctx = make_network(cfg, plan.input_shape, plan.num_classes)
        resolved = network, ctx, plan.shape
        blocks = stage_blocks(plan, rank, placement, device, resolved)
        if world > 1:
            following = list(placement.ranges[(rank + 1) % world])
            rebuilt = initial_checksums(cfg, following, resolved)
            # the blocks it trains and its rebuilds of the next stage's, kept apart: a split block is in both
            checked = [(b.index, weights_checksum(b), block_structure(b)) for b in blocks]
            checked += [(index, checksum, structure) for index, (checksum, structure) in rebuilt.items()]
            mine = [[index, checksum] for index, checksum, _ in checked]
            mine_indices = sorted({index for index, _, _ in checked})
            unlike = blocks_unlike_plan(network, ctx, mine_indices, plan.shape)
            if unlike is None:  # not runnable on the meta device: compare what was built
                unlike = [index for index, _, structure in checked if structure != plan.shape.blocks[index].structure]
            odd = len(network) != plan.blocks or bool(unlike)
    except ConfigError as exc:
        problem = str(exc)
    except Exception:  # noqa: BLE001 - e.g. fewer blocks than the plan: a network unlike the plan's
        odd = True
    if world == 1:
        if problem is not None:
            raise ConfigError(problem)
        return blocks
    seen: dict[int, list[tuple[int, str]]] = {}
    differ, problems = [], []
    for other, text in enumerate(exchange_strings(json.dumps([problem, odd, mine]))):
        other_problem, other_odd, checksums = json.loads(text)
        if other_problem is not None:
            problems.append((other, other_problem))
        if other_odd:
            differ.append(other)
        for index, checksum in checksums:
            seen.setdefault(int(index), []).append((other, checksum))
    if problems:
        raise AgreedError(f"stage {problems[0][0]}: {problems[0][1]}")
    if differ:
        same = next((r for r in range(world) if r not in differ), None)
        pair = f"stage {same} and stage {differ[0]}" if same is not None else "the plan's dry run and every stage"
        raise AgreedError(f"--model {cfg.model.name} built different networks on different ranks ({pair} differ): "
                          f"the factory must depend on its context only")
    for index in sorted(seen):
        (first, expected), *others = seen[index]
        other = next((r for r, checksum in others if checksum != expected), None)
        if other is not None:
            raise AgreedError(f"--model {cfg.model.name}: block {index} starts from different weights in stage "
                              f"{first} and stage {other}: the factory draws random numbers or reads values that "
                              f"differ between processes (build modules in the specs, or only from the run's seed)")
    return blocks


def gradient_links(cfg: Config, placement: Placement | None, world: int | None = None) -> list[tuple[int, int]]:
    """(sender, receiver) of the run's remote-gradient links: DFA's errors, or dL/dh (and h) of split blocks. Without a
    placement (the local launcher, before --partition auto has chosen): every link a placement could need."""
    if cfg.loss.loss == "dfa":
        return dfa_gradient_links(world or len(placement.sizes))
    if placement is not None:
        return placement.gradient_links()
    if cfg.pipeline.partition == "auto" and cfg.loss.local:
        return [link for k in range(world - 1) for link in ((k + 1, k), (k, k + 1))]
    if isinstance(cfg.pipeline.partition, tuple):
        return Placement.parse(cfg.pipeline.partition).gradient_links()
    return []


def agree_partition(plan: RunPlan, rank: int, world: int, device: torch.device,
                    path: str = "host") -> tuple[Placement, dict | None]:
    """Where every block's layer and heads run, the same on every rank: the plan's, or for "auto" the choice stage 0
    makes by profiling the blocks' layers and heads where they will run, which it broadcasts (timings differ
    between processes; the placement must not)."""
    if plan.placement is not None:
        return plan.placement, None
    placement, profile = Placement((1,) * world), None  # the other ranks receive rank 0's choice
    if rank == 0:
        placement, profile = choose_placement(plan, world, device, path)
    # half-blocks per stage, negative where the stage ends with a block's heads (heads first)
    halves = torch.tensor([int(2 * s) * (-1 if k in placement.heads_first else 1) for k, s in enumerate(placement.sizes)])
    dist.broadcast(halves, src=0)
    chosen = halves.tolist()
    return Placement(as_sizes([abs(h) for h in chosen]), frozenset(k for k, h in enumerate(chosen) if h < 0)), profile


def choose_placement(plan: RunPlan, world: int, device: torch.device, path: str = "host") -> tuple[Placement, dict | None]:
    """The run's placement as one process decides it: the plan's, or for "auto" the checkpoint's (a resumed run) or
    the one that profiling the blocks' layers and heads here makes fastest, with the profile."""
    cfg, blocks = plan.cfg, plan.blocks
    if plan.placement is not None:
        return plan.placement, None
    resumed = _checkpoint_placement(cfg, world, blocks) if plan.resume_from is not None else None
    if resumed is not None:  # the placement the checkpoint was written with, not a new profile's
        placement, profile = resumed, {"resumed_placement": list(resumed.entries)}
    else:
        costs = block_costs(cfg, device, path=path, network=plan.shape)
        splittable = list(plan.splittable)
        placement, times = balanced_placement(costs.layer, costs.heads, costs.send, costs.send_h, splittable, world,
                                              exact=cfg.pipeline.heads_max_delay == 0)
        whole = balanced_partition(costs.compute, costs.send, world)
        even = resolve_placement(blocks, world, None).sizes
        ms = lambda values: [1e3 * v for v in values]  # noqa: E731
        profile = {"send_path": path, "compute_ms": ms(costs.compute), "layer_ms": ms(costs.layer),
                   "heads_ms": ms(costs.heads), "send_ms": ms(costs.send), "send_h_ms": ms(costs.send_h),
                   "splittable": splittable, "chosen": list(placement.entries), "chosen_stage_ms": ms(times),
                   "whole_blocks": list(whole), "whole_blocks_stage_ms": ms(stage_times(costs.compute, costs.send, whole)),
                   "even_stage_ms": ms(stage_times(costs.compute, costs.send, even))}
    return placement, profile


def _checkpoint_placement(cfg: Config, world: int, blocks: int) -> Placement | None:
    """The placement of the checkpoint a --partition auto run resumes from; None where there is none that fits
    this run (no checkpoint, another stage count, one written without sizes): every stage then refuses it alike
    when it verifies the checkpoint, or restore_stage refuses a block placed otherwise."""
    try:
        _, manifest = latest_checkpoint(cfg.run.checkpoint_dir)
        placement = Placement.parse([entry["size"] for entry in sorted(manifest["files"], key=lambda e: e["stage"])])
    except (ConfigError, KeyError, TypeError, ValueError):
        return None
    if len(placement.sizes) != world or sum(placement.sizes) != blocks:
        return None
    return placement


def guarded(rank: int, body) -> int:
    """Run a stage body; on failure print the stage, host and traceback, and leave at once with exit 1 (2 for config).
    A stage that used a GPU leaves at once on success too (see [Note: leaving a GPU stage])."""
    try:
        code = body() or 0  # 0, or EXIT_STOPPED for a run stopped early by a signal
        if not torch.cuda.is_initialized():
            return code
        # [Note: leaving a GPU stage] Everything is written and flushed; leave without the interpreter's teardown.
        # Tensors whose use on another stream was recorded (Tensor.record_stream, see pipeline/engine/cuda_streams.py)
        # make the caching allocator record an event when they are freed; freed during interpreter shutdown,
        # after the CUDA runtime began unloading, that raises "driver shutting down" in a destructor and the
        # process aborts (seen on an H100 with K=4 over the local transport).
        torch.cuda.synchronize()
    except ConfigError as exc:
        if rank == 0 or not isinstance(exc, AgreedError):  # every rank raised the same one: stage 0 reports it
            print(f"error: stage {rank}: {exc}", file=sys.stderr, flush=True)
        code = 2
    except (NonFiniteLoss, StallError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = 1
    except PeerGone as exc:  # a consequence of another stage's failure, which the launcher reports
        print(f"error: stage {rank}: {exc}", file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:
        print(f"error: stage {rank} aborted by a repeated interrupt", file=sys.stderr, flush=True)
        code = 130
    except BaseException:
        where = f"stage {rank} (pid {os.getpid()} on {socket.gethostname()})"
        print(f"error: {where} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no collective teardown: peers may be gone or blocked


def run_stage_from_env(cfg: Config) -> int:
    """Entry point of a torchrun worker: rank = stage; LOCAL_RANK picks the GPU."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if cfg.pipeline.transport == "local":
        raise ConfigError("--transport local needs the local launcher (python -m pipeline train --stages K): use dist or zmq under torchrun")
    return guarded(rank, lambda: run_stage(cfg, rank, world, local_rank, local_world))
