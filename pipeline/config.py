"""Run configuration: nested dataclasses with every check on user input in one place.

Each field, with the docstring below it, is also its command-line flag, its --help line and its config-file key
(pipeline/options.py makes them). What depends on the machine a run starts on is judged there, not here
(pipeline/run/resources.py, check_machine).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ConfigError
from pipeline.engine.partition import Placement, format_sizes
from pipeline.data import DATASETS

LOCAL_LOSSES = ("predsim", "pred", "sim")
GLOBAL_LOSSES = ("backprop", "fa")  # one loss at the output, its error sent back through every layer
LOSSES = LOCAL_LOSSES + GLOBAL_LOSSES + ("dfa",)
OPTIMIZERS = ("adam", "amsgrad", "sgd")
NONLINEARITIES = ("relu", "leakyrelu", "tanh")
DEVICES = ("cpu", "cuda")
TRANSPORTS = ("dist", "zmq", "local")
STAGE_ORDERS = ("overlap", "lean")
PRECISIONS = ("fp32", "bf16", "fp16")
DIST_BACKENDS = ("auto", "nccl", "gloo")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _choice(value: str, options: tuple[str, ...], flag: str) -> None:
    _require(value in options, f"unknown {flag} '{value}': choose one of {', '.join(options)}")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The network: which architecture and how wide, deep and regularised it is."""

    name: str = field(default="mlp", metadata={"flag": "--model"})
    """A built-in network (mlp, vgg6a ... vgg19, resnet18 ... resnet152, wresnet10-8 ... wresnet40-10a; see
    pipeline/model/models.py) or a user's factory, package.module:function or path/to/file.py:function (pipeline/model/network.py)."""
    num_layers: int = 1
    """Hidden fully connected layers (the whole mlp, at least 1; the classifier part of a vgg)."""
    num_hidden: int = 1024
    """Units in each hidden fully connected layer."""
    hidden_sizes: tuple[int, ...] | None = field(default=None, metadata={"parse": "int_list"})
    """Width of each hidden fully connected layer (e.g. 800,8,800 for a bottleneck); overrides num_layers and num_hidden."""
    feat_mult: float = 1.0
    """Multiplier on the number of feature maps of the convolutions (vgg, resnet)."""
    nonlin: str | None = None
    """relu, leakyrelu (slope 0.01) or tanh."""
    dropout: float = 0.0
    """Dropout after each nonlinearity; the local loss is taken before it."""
    batch_norm: bool = True
    """Batch norm between each layer and its nonlinearity."""

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and self.name.strip() != "", "--model needs a network name or a factory path")
        if self.nonlin is not None:
            _choice(self.nonlin, NONLINEARITIES, "--nonlin")
        if self.hidden_sizes is not None:
            self.hidden_sizes = tuple(int(w) for w in self.hidden_sizes)
            _require(all(w >= 1 for w in self.hidden_sizes), f"--hidden-sizes must be widths >= 1, got {','.join(map(str, self.hidden_sizes))}")
            self.num_layers = len(self.hidden_sizes)
        _require(self.num_layers >= 0, f"--num-layers must be >= 0, got {self.num_layers}")
        _require(self.num_hidden >= 1, f"--num-hidden must be >= 1, got {self.num_hidden}")
        _require(self.feat_mult > 0 and math.isfinite(self.feat_mult), f"--feat-mult must be > 0, got {self.feat_mult}")
        _require(0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}")


@dataclass(kw_only=True, slots=True)
class LossConfig:
    """How every block learns: its local loss, or global backprop."""

    loss: str = "predsim"
    """predsim, pred, sim (local losses); backprop or fa (one output loss, sent back through the weights or
    through fixed random matrices); dfa (the output error sent straight to every layer)."""
    bio: bool = False
    """Backprop-free heads: feedback-alignment pred head, no learned map before the sim loss, projected labels."""
    beta: float = 0.99
    """Weight of the sim loss in predsim: (1 - beta) * pred + beta * sim."""
    dim_in_decoder: int = 4096
    """Average-pool a conv block's output until C*H*W is at most this before its pred head."""
    target_proj_size: int = 128
    """Size of the bio variant's fixed random projection of the labels."""
    similarity_std: bool = True
    """Reduce feature maps to per-channel standard deviations before the similarity matrix."""
    sim_pool: int = 1
    """Average-pool a conv block's activation with this kernel (and stride) before its sim head's 3x3 conv: a
    cheaper head (k*k fewer positions to convolve and to keep for backward); 1 = none, as the reference."""
    sim_dim: int = 0
    """Most output width of the sim head's learned map (channels of its 3x3 conv, features of its linear map): a
    narrower, cheaper head where the block is wider; 0 = the block's own width, as the reference."""
    feedback_normalization: bool = True
    """DFA feedback matrices with entries of variance 1/(width * classes), as Launay et al.; else N(0, 1)."""

    def __post_init__(self) -> None:
        _choice(self.loss, LOSSES, "--loss")
        _require(0.0 <= self.beta <= 1.0, f"--beta must be in [0, 1], got {self.beta}")
        _require(self.dim_in_decoder >= 1, f"--dim-in-decoder must be >= 1, got {self.dim_in_decoder}")
        _require(self.target_proj_size >= 1, f"--target-proj-size must be >= 1, got {self.target_proj_size}")
        _require(self.sim_pool >= 1, f"--sim-pool must be >= 1, got {self.sim_pool}")
        _require(self.sim_dim >= 0, f"--sim-dim must be >= 0 (0: the block's width), got {self.sim_dim}")
        _require(not self.bio or self.loss in LOCAL_LOSSES, f"--bio changes the local heads and has no effect with --loss {self.loss}: drop one")

    @property
    def local(self) -> bool:
        return self.loss in LOCAL_LOSSES


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """Each block's optimizer and the step learning-rate schedule they share."""

    optim: str = "adam"
    """adam, amsgrad or sgd."""
    lr: float = 5e-4
    """Initial learning rate."""
    momentum: float = 0.0
    """SGD momentum."""
    weight_decay: float = 0.0
    """L2 weight decay."""
    lr_decay_milestones: tuple[int, ...] = field(default=(200, 300, 350, 375), metadata={"nargs": "+"})
    """Epochs after which the learning rate is multiplied by lr_decay_fact."""
    lr_decay_fact: float = 0.25
    """Learning rate factor at each milestone."""

    def __post_init__(self) -> None:
        _choice(self.optim, OPTIMIZERS, "--optim")
        _require(self.lr > 0 and math.isfinite(self.lr), f"--lr must be > 0, got {self.lr}")
        _require(self.momentum >= 0, f"--momentum must be >= 0, got {self.momentum}")
        _require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        _require(self.lr_decay_fact > 0, f"--lr-decay-fact must be > 0, got {self.lr_decay_fact}")
        self.lr_decay_milestones = tuple(int(m) for m in self.lr_decay_milestones)
        _require(all(m >= 1 for m in self.lr_decay_milestones), "--lr-decay-milestones must be epochs >= 1")
        _require(list(self.lr_decay_milestones) == sorted(self.lr_decay_milestones), "--lr-decay-milestones must be increasing")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the batches come from."""

    dataset: str = "mnist"
    """mnist, fashion-mnist, kmnist, cifar10, cifar100, svhn, stl10 or synthetic."""
    data_dir: str = "data"
    """Root folder of the torchvision datasets."""
    download: bool = True
    """Download a dataset that is missing from data_dir."""
    batch_size: int = 128
    """Training and evaluation batch size."""
    augment: bool = True
    """The reference's training augmentations (random crops, flips) for the dataset."""
    synthetic_like: str = "mnist"
    """The dataset whose shape, classes and normalisation synthetic data copies."""
    synthetic_train_size: int = 10_000
    """Synthetic training examples."""
    synthetic_test_size: int = 2_000
    """Synthetic test examples."""
    limit_train_batches: int | None = None
    """Train on at most this many batches per epoch."""
    limit_eval_batches: int | None = None
    """Evaluate on at most this many batches per epoch."""

    def __post_init__(self) -> None:

        _choice(self.dataset, tuple(DATASETS) + ("synthetic",), "--dataset")
        _choice(self.synthetic_like, tuple(DATASETS), "--synthetic-like")
        _require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _require(self.synthetic_train_size >= 1 and self.synthetic_test_size >= 1, "--synthetic-train-size and --synthetic-test-size must be >= 1")
        for flag, limit in (("--limit-train-batches", self.limit_train_batches), ("--limit-eval-batches", self.limit_eval_batches)):
            _require(limit is None or limit >= 1, f"{flag} must be >= 1, got {limit}")

    @property
    def shape_source(self) -> str:
        """The real dataset whose shape and statistics the batches have."""
        return self.synthetic_like if self.dataset == "synthetic" else self.dataset


@dataclass(kw_only=True, slots=True)
class PipelineConfig:
    """How the blocks are cut into concurrent stage processes and how those talk."""

    stages: int = field(default=1, metadata={"unset": True})
    """Number of stage processes K; 1 runs the sequential trainer in this process; under torchrun, its WORLD_SIZE."""
    partition: tuple[float | str, ...] | str | None = field(default=None, metadata={"parse": "partition"})
    """Blocks per stage (e.g. 2,1,1), the output classifier counting as the last block; a half splits a hidden
    block, its layer on one stage and its local heads on the next (1.5,2.5: block 1's layer on stage 0, its heads
    on stage 1), or with an h its heads on one stage and its layer on the next (1.5h,2.5: block 1's heads on
    stage 0, its layer on stage 1); left out, the blocks are split evenly; "auto" times every block's layer and heads and picks the contiguous placement
    whose slowest stage is fastest, splitting a block only where that helps."""
    transport: str = "dist"
    """dist (torch.distributed: NCCL on GPUs, gloo on CPU), zmq (PUSH/PULL + msgpack) or local (torch.multiprocessing queues)."""
    queue_depth: int = 4
    """Batches D that may wait in each of a stage's input and output queues; a faster stage blocks beyond that,
    so it runs at most 2D + 4 batches ahead of the next (the queues, the batches in hand, the one on the link)."""
    stage_order: str = "overlap"
    """How a stage trains its whole blocks on a batch: overlap (all forwards, hand the output on, then each block
    learns: the next stage starts sooner, but every block's graph is held until its turn) or lean (each block
    learns right after its forward, then the output goes on: one block's graph at a time). The same numbers."""
    dfa_sync: bool = False
    """DFA: each stage waits for batch t's error before it forwards batch t+1 (exactly the sequential DFA trainer);
    the same as dfa_max_delay 0."""
    dfa_max_delay: int | None = field(default=2, metadata={"parse": "optional_int", "metavar": "N"})
    """DFA, asynchronous: a stage forwards at most this many batches past the oldest one whose error it still
    awaits (bounded staleness); none (None): no bound, the delay is how far the stage runs ahead of the last one plus
    the time the error takes to come back (on busy cores that return trip can take many batches)."""
    heads_max_delay: int = field(default=0, metadata={"metavar": "D"})
    """Split heads (a half in --partition): the block's layer forwards at most this many batches past the oldest one
    whose dL/dh it still awaits; 0 (default) is exactly the sequential trainer (the stage overlaps the gradient's
    return trip with its other blocks: those before the split one, or with the heads first, those after it); D > 0
    keeps each forward's weights for its delayed update."""
    stall_timeout: float = field(default=300.0, metadata={"metavar": "S"})
    """Seconds a stage may wait for its next batch, for room to send one, or for a remote gradient (a DFA error, a
    split block's dL/dh, or with the heads first its h or heads' weights), before it declares its peer dead or
    deadlocked and fails the run."""
    zmq_host: str = "127.0.0.1"
    """Interface the zmq stages bind on when they are on different hosts; ipc:// is used within one host."""
    zmq_curve_keys: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Folder of ZeroMQ CURVE keys (python -m pipeline keys DIR): zmq links are encrypted and only stages holding
    the client key can send to a stage."""
    master_port: int = 0
    """Port of the local launcher's rendezvous on 127.0.0.1; 0 picks a free one."""
    dist_backend: str = "auto"
    """torch.distributed backend of the dist transport's links: auto (NCCL when every stage is on a GPU of its own,
    gloo otherwise; all ranks decide together on every rank's host and GPU), nccl or gloo."""

    def __post_init__(self) -> None:
        _require(self.stages >= 1, f"--stages must be >= 1, got {self.stages}")
        _choice(self.transport, TRANSPORTS, "--transport")
        _require(self.queue_depth >= 1, f"--queue-depth must be >= 1, got {self.queue_depth}")
        _choice(self.stage_order, STAGE_ORDERS, "--stage-order")
        _require(self.dfa_max_delay is None or self.dfa_max_delay >= 0, f"--dfa-max-delay must be >= 0, got {self.dfa_max_delay}")
        _require(self.heads_max_delay >= 0, f"--heads-max-delay must be >= 0, got {self.heads_max_delay}")
        _require(self.stall_timeout > 0, f"--stall-timeout must be > 0 seconds, got {self.stall_timeout}")
        _require(0 <= self.master_port <= 65535, f"--master-port must be in [0, 65535], got {self.master_port}")
        _choice(self.dist_backend, DIST_BACKENDS, "--dist-backend")
        _require(self.dist_backend == "auto" or self.transport == "dist", f"--dist-backend {self.dist_backend} applies to --transport dist only")
        if self.zmq_curve_keys is not None:
            _require(self.transport == "zmq", "--zmq-curve-keys secures the zmq transport: add --transport zmq")
        if self.dfa_sync:
            self.dfa_max_delay = 0
        if isinstance(self.partition, str):
            _require(self.partition == "auto", f"--partition takes block counts like 2,1,1 or auto, got '{self.partition}'")
        elif self.partition is not None:
            shown = format_sizes(self.partition)
            try:
                sizes = [float(p[:-1] if isinstance(p, str) and p.endswith("h") else p) for p in self.partition]
            except ValueError:
                raise ConfigError(f"--partition takes block counts like 2,1,1 (halves split a block: 1.5,2.5; 1.5h,2.5 "
                                  f"puts the heads first) or auto, got {shown}") from None
            _require(all(math.isfinite(p) and p * 2 == int(p * 2) for p in sizes),
                     f"--partition sizes are whole or half blocks (1.5 splits a block), got {shown}")
            _require(all(p >= 0.5 for p in sizes), f"--partition sizes must be at least a half block, got {shown}")
            _require(len(sizes) == self.stages, f"--partition has {len(sizes)} sizes but --stages is {self.stages}")
            try:
                self.partition = Placement.parse(self.partition).entries
            except ValueError as exc:
                raise ConfigError(f"--{exc}") from None


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """One training run: its length, randomness, hardware and outputs."""

    epochs: int = 1
    """Passes over the training set."""
    seed: int = 1
    """Seed of every random generator (data order, augmentation, initialisation, dropout)."""
    device: str = "cpu"
    """cpu or cuda."""
    threads: int | None = None
    """Intra-op CPU threads per process; default: the cores divided among the processes."""
    out: str | None = None
    """Folder for summary.json, metrics.jsonl, the trained weights and config.toml (which reruns the run)."""
    progress: bool = True
    """Show a progress bar on the console."""
    eval_every: int | None = field(default=None, metadata={"metavar": "N"})
    """Also test every this many training batches (tests.jsonl), besides after each epoch: accuracy against time.
    Exact runs train the same with or without it; with a delay (--heads-max-delay, --dfa-max-delay above 0) every
    test first applies the updates still awaited, as an epoch's test does, which changes the run."""
    log_alignment: int | None = field(default=None, metadata={"metavar": "N"})
    """Every this many training steps, log each hidden layer's angle to the backprop gradient (alignment.jsonl)."""
    checkpoint_dir: str | None = None
    """Folder of resumable checkpoints (every stage writes its part; see pipeline/persistence/checkpoint.py)."""
    checkpoint_every: int | None = field(default=None, metadata={"parse": "every", "unit": "checkpoint_unit",
                                                                 "metavar": "N|Ne"})
    """Write a checkpoint every N training batches, or with a trailing e every N epochs (2e); one is also written
    at the end of the run and when it is interrupted (SIGINT/SIGTERM)."""
    checkpoint_unit: str = field(default="batch", metadata={"flag": None})
    """batch or epoch: what checkpoint_every counts (on the command line, its trailing e)."""
    resume: bool = False
    """Continue from the newest complete checkpoint in checkpoint_dir."""
    auto_resume: bool = False
    """Continue from the newest complete checkpoint in checkpoint_dir if there is one, else start from the beginning:
    the same command starts a run and continues it (a requeued cluster job; see pipeline/run/restarts.py)."""
    max_restarts: int = field(default=0, metadata={"metavar": "N"})
    """The local launcher restarts the stages this many times after a failure, each time resuming from the newest
    complete checkpoint (under torchrun, give torchrun --max-restarts instead)."""
    warmup_batches: int = 1
    """Training batches at the start of each epoch left out of the samples/s figures (at least one)."""
    skip_nonfinite: bool = False
    """Skip (and count) an update whose loss is NaN or infinite, instead of stopping the run there."""
    precision: str = "fp32"
    """fp32; bf16 or fp16: each block's forward under autocast, its output (what a stage sends) in that dtype,
    losses and weights in fp32; fp16 adds a loss scaler per block (pipeline/block/precision.py)."""
    alignment_batches: int = field(default=2, metadata={"flag": "--align-batches", "metavar": "M",
                                                         "written_with": "log_alignment"})
    """Held-out batches each alignment measurement averages over."""
    tensorboard: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Folder for TensorBoard event files (the optional extra: pip install -e .[tensorboard])."""
    deterministic: bool = False
    """Deterministic cuDNN/cuBLAS algorithms and no TF32 (pipeline/run/determinism.py): on one GPU model, runs and
    stage counts agree bit for bit; an op without a deterministic algorithm raises."""

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        _require(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        _choice(self.device, DEVICES, "--device")
        _require(self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}")
        _require(self.eval_every is None or self.eval_every >= 1, f"--eval-every must be >= 1, got {self.eval_every}")
        _require(self.log_alignment is None or self.log_alignment >= 1, f"--log-alignment must be >= 1, got {self.log_alignment}")
        _require(self.alignment_batches >= 1, f"--align-batches must be >= 1, got {self.alignment_batches}")
        _choice(self.precision, PRECISIONS, "--precision")
        _require(self.warmup_batches >= 1, f"--warmup-batches must be >= 1, got {self.warmup_batches}")
        _require(self.checkpoint_every is None or self.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        _choice(self.checkpoint_unit, ("batch", "epoch"), "checkpoint unit")
        _require(self.checkpoint_dir is not None or not (self.resume or self.checkpoint_every or self.auto_resume),
                 "--resume, --auto-resume and --checkpoint-every need --checkpoint-dir DIR")
        _require(self.max_restarts >= 0, f"--max-restarts must be >= 0, got {self.max_restarts}")


@dataclass(kw_only=True, slots=True)
class Config:
    """Everything a run needs; checks that span sections happen here."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        # what depends on the network itself (its block count against --stages and --partition, whether its blocks
        # fit together) is judged by pipeline.model.factories.check_network, which knows the factories
        stages = self.pipeline.stages
        _require(not (self.loss.loss in GLOBAL_LOSSES and stages > 1),
                 f"--loss {self.loss.loss} sends the error back through every layer, so it needs the whole network in one process: use --stages 1 (or --loss dfa)")
        _require(not (self.pipeline.dfa_sync and self.loss.loss != "dfa"), "--dfa-sync applies to --loss dfa only")
        _require(not (self.run.max_restarts and stages == 1),
                 "--max-restarts restarts the stage processes of the local launcher: it needs --stages 2 or more")
        _require(not (self.run.precision == "fp16" and self.loss.loss in GLOBAL_LOSSES),
                 f"--precision fp16 scales each block's own loss, but --loss {self.loss.loss} has one loss for all blocks: use --precision bf16")
        if self.model.nonlin is None:
            self.model.nonlin = "tanh" if self.loss.loss == "dfa" else "relu"
        _require(not (self.pipeline.dist_backend == "nccl" and self.run.device != "cuda"), "--dist-backend nccl needs --device cuda")
        # what depends on this machine (a GPU, the precision it supports, optional packages, key files) is judged
        # where a run starts, not here: pipeline/run/resources.py, check_machine

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (the 'resolved config' of summary.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Rebuild (and re-check) a config from its to_dict() form."""
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kinds = {"model": ModelConfig, "loss": LossConfig, "optim": OptimConfig, "data": DataConfig, "pipeline": PipelineConfig, "run": RunConfig}
        unknown = set(values) - set(sections)
        _require(not unknown, f"unknown config sections: {', '.join(sorted(unknown))}")
        return cls(**{name: kinds[name](**section) for name, section in values.items()})


# Options whose default depends on the learning rule: a rule listed here overrides the base defaults for every
# such option the user leaves unset (on the command line and in a config file; the saved config holds the result).
RULE_DEFAULTS: dict[str, dict[str, Any]] = {
    # the DFA recipe measured in docs/dfa.md (MNIST, MLP 2x800, 2 epochs): 3.17% test error against 4.84% with the
    # local losses' defaults (batch norm, augmentation, lr 5e-4, relu); in a pipeline the errors are applied when
    # they arrive only if asked: over 3 stages a delay of up to 2 batches gave 3.68%, up to 1 batch 3.60%, none 3.17%
    "dfa": {"nonlin": "tanh", "batch_norm": False, "augment": False, "lr": 1e-3, "lr_decay_milestones": (4, 7),
            "lr_decay_fact": 0.3, "dfa_max_delay": 0},
}


def rule_defaults(loss: str) -> dict[str, Any]:
    """The defaults of the rule-dependent options under --loss `loss` (see RULE_DEFAULTS)."""
    model, optim, data, pipeline = ModelConfig(), OptimConfig(), DataConfig(), PipelineConfig()
    base = {"nonlin": "relu", "batch_norm": model.batch_norm, "augment": data.augment, "lr": optim.lr,
            "lr_decay_milestones": optim.lr_decay_milestones, "lr_decay_fact": optim.lr_decay_fact,
            "dfa_max_delay": pipeline.dfa_max_delay}
    return {**base, **RULE_DEFAULTS.get(loss, {})}


def default_threads(processes: int) -> int:
    """Intra-op threads per process when the cores are shared evenly among `processes`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, processes))
