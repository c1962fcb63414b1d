"""Command line: `python -m pipeline train ...` -> a checked Config -> the sequential trainer or the stage runtime.

Exit codes: 0 success, 2 bad usage or config (one line, no traceback), 1 failure while running.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import torch

from pipeline.observe.align import run_align
from pipeline.block.blocks import NonFiniteLoss
from pipeline.config import DEVICES, STAGE_ORDERS, Config, ConfigError, PipelineConfig, default_threads
from pipeline.config_file import config_path, read, to_flags
from pipeline.config_file import write as write_config
from pipeline.model.factories import check_network
from pipeline.run.interrupt import StopRequest
from pipeline.run.launcher import launch
from pipeline.engine.partition import Placement
from pipeline.observe.plots import plot_runs
from pipeline.options import (HelpFormatter, add_train_options, config_from_args, file_values, optional_int, partition,
                              torchrun_world)
from pipeline.run.resources import check_resources
from pipeline.run.restarts import EXIT_STOPPED, attempt, record_start, resolve_resume, stopped_before
from pipeline.run.runtime import run_stage_from_env
from pipeline.engine.schedule_print import describe
from pipeline.sequential import SequentialTrainer
from pipeline.persistence.trained import evaluate, report
from pipeline.transport.zmq import CurveKeys

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
COMMAND_KEYS = {"train": {}, "align": {"align-every": int, "load": str}}  # a command's own config-file keys


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line and exit code 2."""

    def error(self, message: str):
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pipeline", description="Model-parallel pipeline trainer for local learning.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser("train", help="train a network (sequentially, or as concurrent stages)", formatter_class=HelpFormatter)
    add_train_options(train)
    align = commands.add_parser("align", help="angles between each layer's update and the backprop gradient", formatter_class=HelpFormatter)
    add_train_options(align)
    align.set_defaults(alignment_batches=4)  # --align-batches: more held-out batches than train --log-alignment's
    g = align.add_argument_group("alignment")
    g.add_argument("--align-every", type=int, default=50, metavar="N", help="measure every N training steps")
    g.add_argument("--load", default=None, metavar="RUN_DIR", help="measure a finished run (its --out) instead of training")
    ev = commands.add_parser("evaluate", help="test error of every layer of a finished run (its --out), and early exit",
                             formatter_class=HelpFormatter)
    ev.add_argument("run_dir", metavar="RUN_DIR", help="a run's --out: summary.json and weights-stage*.pt")
    ev.add_argument("--device", default="cpu", help=f"{', '.join(DEVICES)}, whatever the run trained on")
    ev.add_argument("--data-dir", default=None, help="root of the torchvision datasets (default: the run's)")
    ev.add_argument("--no-download", action="store_true", help="never download a missing dataset")
    ev.add_argument("--batch-size", type=int, default=None, help="test batch size (default: the run's)")
    ev.add_argument("--limit-eval-batches", type=int, default=None, help="test batches at most")
    ev.add_argument("--threads", type=int, default=None, help="intra-op CPU threads")
    ev.add_argument("--exit-threshold", type=float, nargs="+", default=[], metavar="T",
                    help="early exit: each example is answered by the first layer whose classifier is at least T "
                         "confident (softmax); prints accuracy and average depth for each T")
    plot = commands.add_parser("plot", help="PNGs of runs: per-layer test error, per-block loss, stage time fractions",
                               formatter_class=HelpFormatter)
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="runs' --out folders, overlaid")
    plot.add_argument("--out", required=True, help="folder for the PNGs")
    plot.add_argument("--labels", nargs="+", default=None, help="legend names of the runs (default: folder, rule, K)")
    sched = commands.add_parser("schedule", help="every stage's actions per training batch, side by side, and a "
                                "simulated timeline (pipeline/engine/schedule.py)", formatter_class=HelpFormatter)
    sched.add_argument("--stages", type=int, default=None, metavar="K", help="stages, one block each (or give --partition)")
    sched.add_argument("--partition", type=partition, default=None, help="as for train: 2,2 or 1.5,2.5 or 1.5h,2.5")
    sched.add_argument("--loss", default="predsim", help="dfa for DFA's schedule; any other rule has the local one")
    sched.add_argument("--stage-order", default="overlap", choices=STAGE_ORDERS, help="as for train")
    sched.add_argument("--heads-max-delay", type=int, default=0, metavar="D", help="as for train")
    sched.add_argument("--dfa-max-delay", type=optional_int, default=PipelineConfig().dfa_max_delay, metavar="N",
                       help="as for train (none: unbounded)")
    sched.add_argument("--batches", type=int, default=3, help="batches in the simulated timeline")
    keys = commands.add_parser("keys", help="make ZeroMQ CURVE keys for --zmq-curve-keys")
    keys.add_argument("folder", help="where to write server.key*, client.key* and authorized/")
    return parser


def run_train(cfg: Config) -> int:
    """Dispatch a checked config: a torchrun rank, the local launcher for K > 1, or the sequential trainer."""

    world = torchrun_world()
    if world is not None:  # every worker of a torchrun group, started or restarted by its agent

        stopped = stopped_before(cfg, attempt())
        if stopped is not None:  # the workers got the signal, not the agent: the run stopped, it did not fail
            if world[0] == 0:
                print(f"restart {attempt()}: the run was stopped by a signal at epoch {stopped['epoch']} batch "
                      f"{stopped['batch']}: not training on", file=sys.stderr, flush=True)
            return EXIT_STOPPED
        cfg = resolve_resume(cfg, attempt(), say=world[0] == 0)
        if world[0] == 0:
            record_start(cfg, attempt())
        return run_stage_from_env(cfg)
    if cfg.pipeline.stages > 1:

        return launch(cfg)

    trainer = SequentialTrainer(resolve_resume(cfg, 0))
    summary = trainer.run(StopRequest().install())
    return EXIT_STOPPED if summary["stopped_at"] else EXIT_OK


def command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The sub-parser of one command (train, align, keys)."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[command]


def run_evaluate(args: argparse.Namespace) -> int:
    """`evaluate RUN_DIR`: rebuild a finished run's network and print each layer's test error (and early exit)."""


    for t in args.exit_threshold:
        if not 0.0 <= t <= 1.0:
            raise ConfigError(f"--exit-threshold takes softmax confidences in [0, 1], got {t}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads or default_threads(1))
    data = dict(data_dir=args.data_dir, batch_size=args.batch_size, limit_eval_batches=args.limit_eval_batches,
                download=False if args.no_download else None)
    print(report(evaluate(args.run_dir, args.device, args.exit_threshold, **data)))
    return EXIT_OK


def run_schedule(args: argparse.Namespace) -> str:
    """What `python -m pipeline schedule` prints, or a ConfigError for a placement it cannot take."""
    if (args.stages is None) == (args.partition is None or args.partition == "auto"):
        raise ConfigError("schedule takes --stages K (one block per stage) or an explicit --partition")
    if args.batches < 1 or args.heads_max_delay < 0 or (args.dfa_max_delay or 0) < 0:
        raise ConfigError("--batches must be >= 1 and the delays >= 0")
    try:
        placement = Placement((1,) * args.stages) if args.stages else Placement.parse(args.partition)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    dfa = args.loss == "dfa"
    if dfa and placement.split:
        raise ConfigError("--loss dfa trains whole blocks: no halves in --partition")
    return describe(placement, args.batches, dfa=dfa, lean=args.stage_order == "lean",
                    heads_delay=args.heads_max_delay, dfa_delay=args.dfa_max_delay if dfa else 0)


def main(argv: list[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        parser = build_parser()
        path = config_path(argv)
        if path is not None and argv and argv[0] in ("train", "align"):  # the file's options first: flags win
            argv = [argv[0], *to_flags(read(path), path, COMMAND_KEYS[argv[0]]), *argv[1:]]
        args = parser.parse_args(argv)
        if args.command == "keys":

            CurveKeys.create(args.folder)
            print(f"wrote CURVE keys to {args.folder}: give every stage --zmq-curve-keys {args.folder} (keep it private)")
            return EXIT_OK
        if args.command == "evaluate":
            return run_evaluate(args)
        if args.command == "schedule":
            print(run_schedule(args))
            return EXIT_OK
        if args.command == "plot":

            for path in plot_runs(args.run_dirs, args.out, args.labels):
                print(f"wrote {path}")
            return EXIT_OK
        cfg = config_from_args(args)
        shape = check_network(cfg)[2]  # the factory imports, its blocks fit together, the stages fit its blocks
        check_resources(cfg, shape)  # output folders, batch size, memory: judged before any process starts
        if args.command == "train" and cfg.run.out:
            write_config(cfg.run.out, file_values(cfg))
        if args.command == "align":
            if args.align_every < 1:
                raise ConfigError(f"--align-every must be >= 1, got {args.align_every}")
            if cfg.pipeline.stages > 1:
                raise ConfigError("align trains in one process: drop --stages (use train --log-alignment for pipelines)")

            run_align(cfg, args.align_every, args.load)
            return EXIT_OK
        return run_train(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        return EXIT_FAILURE
