"""The run plan: what every stage of one attempt must agree on, decided once and handed to each stage.

The local launcher (and the in-process runner) makes it before the stages start; under torchrun, where no process
stands above the ranks, rank 0 makes it and sends it to the others (`share_plan`). A stage takes from it:
- the checked config, with `resume` as resolved for this attempt;
- the network's dry-run shapes and fingerprint: it builds its blocks from them, without a dry run of its own,
  and compares what it built with them (pipeline/run/runtime.py, agree_network);
- the placement of every block's layer and heads, and so the links it opens (with --partition auto, still to
  be chosen: stage 0 profiles the blocks where they will run and sends its choice, agree_partition);
- the checkpoint the attempt resumes from and the attempt's token (pipeline/persistence/checkpoint_writer.py).
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass

import torch.distributed as dist

from pipeline.config import Config, ConfigError
from pipeline.engine.partition import Placement, resolve_placement
from pipeline.errors import AgreedError
from pipeline.model.dry_run import NetworkShape
from pipeline.model.factories import check_network, splittable
from pipeline.persistence.checkpoint import latest_checkpoint


@dataclass(frozen=True)
class RunPlan:
    """One attempt of a run, as every stage must see it."""

    cfg: Config
    input_shape: tuple[int, int, int]
    num_classes: int
    shape: NetworkShape  # the dry run's: every block's shapes and structure
    placement: Placement | None  # None: --partition auto, chosen by stage 0 once the stages run
    splittable: tuple[bool, ...]  # which blocks --partition auto may split (empty for any other partition)
    resume_from: str | None  # the checkpoint folder this attempt resumes from
    token: str  # this attempt's, the same on every stage

    @property
    def blocks(self) -> int:
        return len(self.shape.blocks)

    @property
    def network(self) -> str:
        """The network's fingerprint (what checkpoints record)."""
        return self.shape.fingerprint


def make_plan(cfg: Config) -> RunPlan:
    """The plan of an attempt of the run `cfg` (its `resume` resolved); a ConfigError for a run that cannot start."""
    resolved = network, ctx, shape = check_network(cfg)
    auto = cfg.pipeline.partition == "auto"
    placement = None if auto else resolve_placement(len(network), cfg.pipeline.stages, cfg.pipeline.partition)
    split = tuple(cfg.loss.local and splittable(cfg, i, resolved) is None for i in range(len(network))) if auto else ()
    resume_from = latest_checkpoint(cfg.run.checkpoint_dir)[0] if cfg.run.resume else None
    return RunPlan(cfg, ctx.input_shape, ctx.num_classes, shape, placement, split, resume_from, uuid.uuid4().hex)


# What each rank keeps of its own config under torchrun: where this node binds, reads and writes (README: a
# node's --zmq-host is its own address), not what the stages must agree on
NODE_LOCAL = {"data": ("data_dir", "download"), "pipeline": ("zmq_host", "zmq_curve_keys"),
              "run": ("out", "tensorboard", "threads", "progress")}


def share_plan(cfg: Config, rank: int) -> RunPlan:
    """Under torchrun (collective): rank 0 makes the plan from its config and every rank receives it, keeping its
    own node-local settings (NODE_LOCAL). A plan rank 0 cannot make is refused on every rank with rank 0's reason
    (and rank 0 raises what it met). broadcast_object_list pickles the plan: it goes only between the ranks of
    this run's own process group."""
    made: list = [None]
    failed: BaseException | None = None
    if rank == 0:
        try:
            made = [make_plan(cfg)]
        except Exception as exc:  # noqa: BLE001 - every rank must leave the broadcast, and with the reason
            failed, made = exc, [str(exc) if isinstance(exc, ConfigError) else f"stage 0 could not plan the run "
                                 f"({type(exc).__name__}: {exc})"]
    dist.broadcast_object_list(made, src=0)
    if failed is not None and not isinstance(failed, ConfigError):
        raise failed
    if isinstance(made[0], str):
        raise AgreedError(made[0])
    sections = {name: dataclasses.replace(getattr(made[0].cfg, name), **{f: getattr(getattr(cfg, name), f) for f in fields})
                for name, fields in NODE_LOCAL.items()}
    return dataclasses.replace(made[0], cfg=dataclasses.replace(made[0].cfg, **sections))
