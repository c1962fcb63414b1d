"""Command line: `python -m pipeline train ...` -> a checked Config -> the sequential trainer or the stage runtime.

Exit codes: 0 success, 2 bad usage or config (one line, no traceback), 1 failure while running.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any

import torch

from pipeline.observe.align import run_align
from pipeline.block.blocks import NonFiniteLoss
from pipeline.config import (DEVICES, DIST_BACKENDS, LOSSES, NONLINEARITIES, OPTIMIZERS, TRANSPORTS, Config, ConfigError,
                             DataConfig, LossConfig, ModelConfig, OptimConfig, PipelineConfig, RunConfig, RULE_DEFAULTS,
                             STAGE_ORDERS, default_threads, rule_defaults)
from pipeline.config_file import config_path, file_values, read, to_flags
from pipeline.config_file import write as write_config
from pipeline.model.factories import check_network
from pipeline.run.interrupt import StopRequest
from pipeline.run.launcher import launch
from pipeline.model.models import MODELS
from pipeline.engine.partition import Placement
from pipeline.observe.plots import plot_runs
from pipeline.run.resources import check_resources
from pipeline.run.restarts import EXIT_STOPPED, attempt, record_start, resolve_resume, stopped_before
from pipeline.run.runtime import run_stage_from_env
from pipeline.engine.schedule_print import describe
from pipeline.sequential import SequentialTrainer
from pipeline.persistence.trained import evaluate, report
from pipeline.transport.zmq import CurveKeys

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Unset:
    """The parsed default of an option whose default depends on the learning rule (RULE_DEFAULTS): 'not given'."""

    def __repr__(self) -> str:
        return "unset"


UNSET = _Unset()


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line and exit code 2."""

    def error(self, message: str):
        raise ConfigError(message)


class _Formatter(argparse.HelpFormatter):
    """Help that shows every option's default (rule-dependent ones spell theirs out in the help text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default %(default)s)".lstrip()


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 2,1,1, got '{text}'") from None


def _size(part: str) -> float | str:
    """One --partition entry: a number, or a half marked h, kept as text for Placement.parse."""
    number = float(part[:-1] if part.endswith("h") else part)
    return part if part.endswith("h") else number


def _partition(text: str) -> tuple[float | str, ...] | str:
    if text == "auto":
        return text
    try:
        return tuple(_size(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block counts like 2,1,1 (halves split a block: 1.5,2.5, or with its "
                                         f"heads first: 1.5h,2.5) or auto, got '{text}'") from None


def _every(text: str) -> tuple[int, str]:
    unit = "epoch" if text.endswith("e") else "batch"
    try:
        return int(text[:-1] if unit == "epoch" else text), unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count of batches (500) or epochs (2e), got '{text}'") from None


def _optional_int(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got '{text}'") from None


def _rule_help(name: str) -> str:
    """'(default X; under --loss dfa: Y)' for an option whose default depends on the learning rule."""
    def show(value) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)

    base = rule_defaults("predsim")[name]
    rules = "".join(f"; under --loss {rule}: {show(values[name])}" for rule, values in RULE_DEFAULTS.items() if name in values)
    return f"(default {show(base)}{rules})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pipeline", description="Model-parallel pipeline trainer for local learning.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser("train", help="train a network (sequentially, or as concurrent stages)", formatter_class=_Formatter)
    add_train_arguments(train)
    align = commands.add_parser("align", help="angles between each layer's update and the backprop gradient", formatter_class=_Formatter)
    add_train_arguments(align)
    g = align.add_argument_group("alignment")
    g.add_argument("--align-every", type=int, default=50, metavar="N", help="measure every N training steps")
    g.add_argument("--align-batches", type=int, default=4, metavar="M", help="held-out batches per measurement")
    g.add_argument("--load", default=None, metavar="RUN_DIR", help="measure a finished run (its --out) instead of training")
    ev = commands.add_parser("evaluate", help="test error of every layer of a finished run (its --out), and early exit",
                             formatter_class=_Formatter)
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
                               formatter_class=_Formatter)
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="runs' --out folders, overlaid")
    plot.add_argument("--out", required=True, help="folder for the PNGs")
    plot.add_argument("--labels", nargs="+", default=None, help="legend names of the runs (default: folder, rule, K)")
    sched = commands.add_parser("schedule", help="every stage's actions per training batch, side by side, and a "
                                "simulated timeline (pipeline/engine/schedule.py)", formatter_class=_Formatter)
    sched.add_argument("--stages", type=int, default=None, metavar="K", help="stages, one block each (or give --partition)")
    sched.add_argument("--partition", type=_partition, default=None, help="as for train: 2,2 or 1.5,2.5 or 1.5h,2.5")
    sched.add_argument("--loss", default="predsim", help="dfa for DFA's schedule; any other rule has the local one")
    sched.add_argument("--stage-order", default="overlap", choices=STAGE_ORDERS, help="as for train")
    sched.add_argument("--heads-max-delay", type=int, default=0, metavar="D", help="as for train")
    sched.add_argument("--dfa-max-delay", type=_optional_int, default=PipelineConfig().dfa_max_delay, metavar="N",
                       help="as for train (none: unbounded)")
    sched.add_argument("--batches", type=int, default=3, help="batches in the simulated timeline")
    keys = commands.add_parser("keys", help="make ZeroMQ CURVE keys for --zmq-curve-keys")
    keys.add_argument("folder", help="where to write server.key*, client.key* and authorized/")
    return parser


def _model_names() -> str:

    names = list(MODELS)
    return ", ".join(n for n in names if not n.startswith(("vgg", "resnet", "wresnet"))) + ", vgg6a ... vgg19, resnet18 ... resnet152, wresnet10-8 ... wresnet40-10a"


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    m, lo, o, d, pi, r = ModelConfig(), LossConfig(), OptimConfig(), DataConfig(), PipelineConfig(), RunConfig()
    g = p.add_argument_group("model")
    g.add_argument("--model", default=m.name, help=f"a built-in network ({_model_names()}), or your own: "
                   f"package.module:function or path/to/file.py:function (default {m.name})")
    g.add_argument("--num-layers", type=int, default=m.num_layers, help="hidden fully connected layers")
    g.add_argument("--num-hidden", type=int, default=m.num_hidden, help="units per hidden fully connected layer")
    g.add_argument("--hidden-sizes", type=_int_list, default=None, help="width of each hidden layer, e.g. 800,8,800")
    g.add_argument("--feat-mult", type=float, default=m.feat_mult, help="multiplier on vgg feature maps")
    g.add_argument("--nonlin", default=UNSET, help=f"{', '.join(NONLINEARITIES)} {_rule_help('nonlin')}")
    g.add_argument("--dropout", type=float, default=m.dropout, help="dropout after each nonlinearity")
    g.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=UNSET,
                   help=f"batch norm before the nonlinearities {_rule_help('batch_norm')}")
    g = p.add_argument_group("learning rule")
    g.add_argument("--loss", default=lo.loss, help=f"{', '.join(LOSSES)} (default {lo.loss})")
    g.add_argument("--bio", action="store_true", help="backprop-free heads: feedback alignment and projected labels")
    g.add_argument("--beta", type=float, default=lo.beta, help="weight of sim in predsim")
    g.add_argument("--dim-in-decoder", type=int, default=lo.dim_in_decoder, help="max features into a conv block's pred head")
    g.add_argument("--target-proj-size", type=int, default=lo.target_proj_size, help="bio label projection size")
    g.add_argument("--no-similarity-std", action="store_true", help="no std reduction of feature maps in the similarity matrix")
    g.add_argument("--sim-pool", type=int, default=lo.sim_pool, help="average-pool kernel before a conv block's sim head (1: none)")
    g.add_argument("--sim-dim", type=int, default=lo.sim_dim, help="most width of the sim head's learned map (0: the block's width)")
    g.add_argument("--no-feedback-normalization", action="store_true", help="DFA feedback matrices N(0,1), not scaled")
    g = p.add_argument_group("optimizer")
    g.add_argument("--optim", default=o.optim, help=f"{', '.join(OPTIMIZERS)}")
    g.add_argument("--lr", type=float, default=UNSET, help=f"initial learning rate {_rule_help('lr')}")
    g.add_argument("--momentum", type=float, default=o.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=o.weight_decay, help="L2 weight decay")
    g.add_argument("--lr-decay-milestones", type=int, nargs="+", default=UNSET,
                   help=f"epochs after which the learning rate is multiplied by --lr-decay-fact {_rule_help('lr_decay_milestones')}")
    g.add_argument("--lr-decay-fact", type=float, default=UNSET, help=f"learning rate factor {_rule_help('lr_decay_fact')}")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset, help="mnist, fashion-mnist, kmnist, cifar10, cifar100, svhn, stl10, synthetic")
    g.add_argument("--data-dir", default=d.data_dir, help="root of the torchvision datasets")
    g.add_argument("--no-download", action="store_true", help="never download a missing dataset")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="training and test batch size")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=UNSET,
                   help=f"the reference's training augmentation {_rule_help('augment')}")
    g.add_argument("--synthetic-like", default=d.synthetic_like, help="dataset whose shape synthetic data copies")
    g.add_argument("--synthetic-train-size", type=int, default=d.synthetic_train_size, help="synthetic training examples")
    g.add_argument("--synthetic-test-size", type=int, default=d.synthetic_test_size, help="synthetic test examples")
    g.add_argument("--limit-train-batches", type=int, default=None, help="train batches per epoch at most")
    g.add_argument("--limit-eval-batches", type=int, default=None, help="test batches per evaluation at most")
    g = p.add_argument_group("pipeline")
    g.add_argument("--stages", type=int, default=None, help="stage processes K (default 1; WORLD_SIZE under torchrun)")
    g.add_argument("--partition", type=_partition, default=None,
                   help="blocks per stage, e.g. 2,1,1; a half splits a block, its layer on one stage and its heads on the "
                        "next (1.5,2.5), or with h its heads first (1.5h,2.5); auto: balanced by measured layer and "
                        "head times (default: even)")
    g.add_argument("--transport", default=pi.transport, help=f"{', '.join(TRANSPORTS)} (default {pi.transport})")
    g.add_argument("--queue-depth", type=int, default=pi.queue_depth, help="batches in flight between two stages")
    g.add_argument("--stage-order", default=pi.stage_order,
                   help="overlap: hand the batch on after the forwards, then learn; lean: learn each block after its "
                        "forward (one graph held at a time), then hand on (default %(default)s)")
    g.add_argument("--zmq-host", default=pi.zmq_host, help="interface zmq stages bind on across hosts")
    g.add_argument("--zmq-curve-keys", default=None, metavar="DIR", help="CURVE keys: encrypted zmq, only key holders join")
    g.add_argument("--master-port", type=int, default=pi.master_port, help="local launcher rendezvous port (0: any free)")
    g.add_argument("--dist-backend", default=pi.dist_backend,
                   help=f"{', '.join(DIST_BACKENDS)}: links of --transport dist (auto: NCCL iff every stage has a GPU of its own)")
    g.add_argument("--stall-timeout", type=float, default=pi.stall_timeout, metavar="S",
                   help="fail the run when a stage waits S seconds for a peer (default %(default)s)")
    g.add_argument("--dfa-sync", action="store_true", help="DFA: wait for batch t's error before forwarding t+1 (exact)")
    g.add_argument("--heads-max-delay", type=int, default=0, metavar="D",
                   help="split heads: a block's layer forwards at most D batches past an awaited dL/dh (0: exact)")
    g.add_argument("--dfa-max-delay", type=_optional_int, default=UNSET, metavar="N",
                   help=f"DFA: forward at most N batches past an awaited error ('none': unbounded) {_rule_help('dfa_max_delay')}")
    g = p.add_argument_group("run")
    g.add_argument("--epochs", type=int, default=r.epochs, help="passes over the training set")
    g.add_argument("--seed", type=int, default=r.seed, help="seed of every random generator")
    g.add_argument("--device", default=r.device, help=f"{', '.join(DEVICES)}")
    g.add_argument("--threads", type=int, default=None, help="intra-op CPU threads per process")
    g.add_argument("--out", default=None, help="folder for summary.json, metrics.jsonl, weights and config.toml")
    g.add_argument("--config", default=None, metavar="FILE.toml",
                   help="train options from a TOML file, keys named like the flags (num-hidden = 800); flags given here win")
    g.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="also test every N training batches, besides after each epoch (tests.jsonl)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also write TensorBoard event files into DIR (optional extra: pip install -e '.[tensorboard]')")
    g.add_argument("--warmup-batches", type=int, default=r.warmup_batches, help="batches per epoch left out of samples/s")
    g.add_argument("--skip-nonfinite", action="store_true", help="skip updates with a NaN/Inf loss instead of stopping")
    g.add_argument("--precision", default=r.precision,
                   help="fp32, bf16 or fp16: each block's forward under autocast, half-size activations (default %(default)s)")
    g.add_argument("--deterministic", action="store_true", help="deterministic cuDNN/cuBLAS, no TF32: bit-identical GPU runs")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-dir", default=None, help="folder of resumable checkpoints")
    g.add_argument("--checkpoint-every", type=_every, default=None, metavar="N|Ne",
                   help="checkpoint every N training batches, or every N epochs with a trailing e (e.g. 2e)")
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    g.add_argument("--auto-resume", action="store_true",
                   help="continue from the newest complete checkpoint if there is one, else start: for requeued jobs")
    g.add_argument("--max-restarts", type=int, default=r.max_restarts, metavar="N",
                   help="restart the stages up to N times after a failure, resuming from the newest checkpoint "
                        "(local launcher; under torchrun use its --max-restarts)")
    g.add_argument("--log-alignment", type=int, default=None, metavar="N",
                   help="every N steps log each layer's angle to the backprop gradient")


def torchrun_world() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def config_from_args(a: argparse.Namespace) -> Config:
    world = torchrun_world()
    stages = a.stages
    rule = rule_defaults(a.loss)  # what the learning rule picks for the options left unset

    def chosen(name: str):
        value = getattr(a, name)
        return rule[name] if value is UNSET else value

    if world is not None:
        if stages is not None and stages != world[1]:
            raise ConfigError(f"--stages {stages} but torchrun started {world[1]} processes: drop --stages or match them")
        if a.max_restarts:
            raise ConfigError("--max-restarts is the local launcher's: under torchrun give torchrun --max-restarts N")
        stages = world[1]
    return Config(
        model=ModelConfig(name=a.model, num_layers=a.num_layers, num_hidden=a.num_hidden, hidden_sizes=a.hidden_sizes,
                          feat_mult=a.feat_mult,
                          nonlin=chosen("nonlin"), dropout=a.dropout, batch_norm=chosen("batch_norm")),
        loss=LossConfig(loss=a.loss, bio=a.bio, beta=a.beta, dim_in_decoder=a.dim_in_decoder,
                        target_proj_size=a.target_proj_size, similarity_std=not a.no_similarity_std,
                        sim_pool=a.sim_pool, sim_dim=a.sim_dim,
                        feedback_normalization=not a.no_feedback_normalization),
        optim=OptimConfig(optim=a.optim, lr=chosen("lr"), momentum=a.momentum, weight_decay=a.weight_decay,
                          lr_decay_milestones=tuple(chosen("lr_decay_milestones")), lr_decay_fact=chosen("lr_decay_fact")),
        data=DataConfig(dataset=a.dataset, data_dir=a.data_dir, download=not a.no_download, batch_size=a.batch_size,
                        augment=chosen("augment"), synthetic_like=a.synthetic_like,
                        synthetic_train_size=a.synthetic_train_size, synthetic_test_size=a.synthetic_test_size,
                        limit_train_batches=a.limit_train_batches, limit_eval_batches=a.limit_eval_batches),
        pipeline=PipelineConfig(stages=1 if stages is None else stages, partition=a.partition, transport=a.transport,
                                queue_depth=a.queue_depth, stage_order=a.stage_order, zmq_host=a.zmq_host, dfa_sync=a.dfa_sync,
                                dfa_max_delay=chosen("dfa_max_delay"), heads_max_delay=a.heads_max_delay, stall_timeout=a.stall_timeout, master_port=a.master_port,
                                zmq_curve_keys=a.zmq_curve_keys, dist_backend=a.dist_backend),
        run=RunConfig(epochs=a.epochs, seed=a.seed, device=a.device, threads=a.threads, out=a.out,
                      progress=not a.no_progress, tensorboard=a.tensorboard, log_alignment=a.log_alignment, eval_every=a.eval_every, skip_nonfinite=a.skip_nonfinite,
                      precision=a.precision,
                      deterministic=a.deterministic,
                      checkpoint_dir=a.checkpoint_dir, resume=a.resume,
                      auto_resume=a.auto_resume, max_restarts=a.max_restarts, warmup_batches=a.warmup_batches,
                      checkpoint_every=a.checkpoint_every[0] if a.checkpoint_every else None,
                      checkpoint_unit=a.checkpoint_every[1] if a.checkpoint_every else "batch",
                      alignment_batches=getattr(a, "align_batches", RunConfig().alignment_batches)),
    )


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


def resolved_options(cfg: Config) -> dict[str, Any]:
    """Option values (by argparse dest) that the config resolved: the learning rule's defaults, the stage count."""
    return {"nonlin": cfg.model.nonlin, "batch_norm": cfg.model.batch_norm, "augment": cfg.data.augment,
            "lr": cfg.optim.lr, "lr_decay_milestones": cfg.optim.lr_decay_milestones,
            "lr_decay_fact": cfg.optim.lr_decay_fact, "dfa_max_delay": cfg.pipeline.dfa_max_delay,
            "stages": cfg.pipeline.stages}


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
            argv = [argv[0], *to_flags(read(path), command_parser(parser, argv[0]), path), *argv[1:]]
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
        check_network(cfg)  # the factory imports, its blocks fit together, the stages fit its blocks
        check_resources(cfg)  # output folders, batch size, memory: judged before any process starts
        if args.command == "train" and cfg.run.out:
            write_config(cfg.run.out, file_values(args, command_parser(parser, "train"), resolved_options(cfg)))
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
