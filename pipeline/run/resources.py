"""Preflight of a run's resources, before any process starts: the output folders, the batch size against the
training set, and an estimate of each stage's memory against the device's (a ConfigError otherwise).

[Note: memory estimate] Each block with a sim loss builds B x B similarity matrices: at B = 60,000 one of them
takes 14 GB, and the kernel killed `--batch-size 100000` on MNIST. The estimate counts, per block, SIM_COPIES
B x B fp32 matrices (the features', the labels', their difference and its gradient) and ACTIVATION_COPIES
copies of its B x features activation (layer, batch norm, nonlinearity, dropout, the sim map, their
gradients); a stage frees a block's intermediates before the next block runs, so a stage needs its largest
block's share plus every block's weights, gradients and Adam moments. It is a lower bound of the right order,
meant to refuse what cannot fit, not to promise that the rest does.
"""

from __future__ import annotations

import math
import os
import tempfile

from pipeline.config import Config, ConfigError
from pipeline.data import DATASETS
from pipeline.model.dry_run import NetworkShape
from pipeline.model.factories import resolve
from pipeline.engine.partition import resolve_partition
from pipeline.block.precision import supported
from pipeline.observe.tensorboard_log import check_available
import torch

SIM_COPIES = 4
ACTIVATION_COPIES = 6
FP32 = 4
GIB = 2 ** 30


def check_device(cfg: Config) -> None:
    """The config's device is on this machine and supports its precision."""
    run = cfg.run
    if run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA GPU is visible: use --device cpu")
    if run.precision != "fp32" and not supported(run.precision, run.device):
        raise ConfigError(f"--precision {run.precision} is not supported on {run.device} by torch {torch.__version__}: "
                          f"use --precision fp32 or another device")


def check_machine(cfg: Config) -> None:
    """What the config asks of this machine, judged where a run starts (not when a Config is made, so that a
    finished run's config loads anywhere): the GPU, the precision it supports, TensorBoard, the CURVE key files."""
    check_device(cfg)
    run, pipe = cfg.run, cfg.pipeline
    if run.tensorboard:
        check_available()
    if pipe.zmq_curve_keys is not None:
        missing = [n for n in ("server.key_secret", "client.key_secret", "authorized")
                   if not os.path.exists(os.path.join(pipe.zmq_curve_keys, n))]
        if missing:
            raise ConfigError(f"--zmq-curve-keys {pipe.zmq_curve_keys} lacks {', '.join(missing)}: make the keys with "
                              f"python -m pipeline keys DIR")


def check_resources(cfg: Config, shape: NetworkShape | None = None) -> None:
    """Every resource check of a run; raises ConfigError with one line (`shape`: the network's dry run where the
    caller made it, check_network's, else one made here)."""
    shape = shape or resolve(cfg)[2]
    check_machine(cfg)
    for flag, folder in (("--out", cfg.run.out), ("--checkpoint-dir", cfg.run.checkpoint_dir), ("--tensorboard", cfg.run.tensorboard)):
        if folder:
            check_writable(flag, folder)
    check_batch_size(cfg, shape)
    check_memory(cfg, shape)


def check_writable(flag: str, folder: str) -> None:
    """Make the folder (as the run would) and write a probe file into it."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {folder} cannot be written ({exc.strerror or exc}): give a folder you can write to") from None


def train_examples(cfg: Config) -> int:

    return cfg.data.synthetic_train_size if cfg.data.dataset == "synthetic" else DATASETS[cfg.data.dataset].train_examples


def check_batch_size(cfg: Config, shape: NetworkShape) -> None:
    """A batch the training set can fill, and, with batch norm, more than one example (training batch norm takes a
    variance over the batch; a last batch of one is dropped, pipeline/data.py)."""

    examples, batch = train_examples(cfg), cfg.data.batch_size
    if batch > examples:
        raise ConfigError(f"--batch-size {batch} is larger than the {examples} examples of the {cfg.data.dataset} "
                          f"training set: use at most {examples}")
    normed = [i for i, block in enumerate(shape.blocks) if block.batch_norm]
    if batch == 1 and normed:
        raise ConfigError(f"--batch-size 1 cannot train batch norm (block {normed[0]} has it, and a batch of one has no "
                          f"variance where it normalises one value per channel): use a batch of at least 2, or a "
                          f"network without batch norm")


def block_bytes(cfg: Config, shape: NetworkShape) -> list[tuple[int, int]]:
    """(transient bytes at batch B, resident bytes) of each block, in order; see [Note: memory estimate]."""

    batch = cfg.data.batch_size
    result = []
    for block in shape.blocks:  # shapes and parameter counts from the network's dry run
        similarity = SIM_COPIES * batch * batch if block.similarity else 0
        transient = FP32 * (batch * (math.prod(block.input) + ACTIVATION_COPIES * math.prod(block.activation)) + similarity)
        result.append((transient, 4 * FP32 * block.parameters))  # weights, gradients, two Adam moments
    return result


def stage_bytes(cfg: Config, shape: NetworkShape | None = None) -> list[int]:
    """Estimated peak bytes of each stage (even split for --partition auto: its split is measured at start)."""
    blocks = block_bytes(cfg, shape or resolve(cfg)[2])
    sizes = cfg.pipeline.partition if isinstance(cfg.pipeline.partition, tuple) else None
    ranges = resolve_partition(len(blocks), cfg.pipeline.stages, sizes)
    return [max(blocks[i][0] for i in r) + sum(blocks[i][1] for i in r) for r in ranges]


def device_memory(device: str) -> tuple[int, str]:
    """(bytes, description): physical RAM on CPU, free memory of this process's GPU on CUDA."""
    if device == "cuda":

        index = int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count())
        free, _ = torch.cuda.mem_get_info(index)
        return free, f"GPU {index} (free memory)"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this host (RAM)"


def check_memory(cfg: Config, shape: NetworkShape | None = None) -> None:
    """Refuse a run whose stages on this device need more memory than the device has."""
    stages = stage_bytes(cfg, shape)
    if "LOCAL_WORLD_SIZE" in os.environ:  # torchrun: one stage per process, LOCAL_WORLD_SIZE of them on this node
        sharing = 1 if cfg.run.device == "cuda" else int(os.environ["LOCAL_WORLD_SIZE"])
        need = max(stages) * sharing
    else:  # the sequential trainer or the local launcher: every stage on this host (and on one GPU)
        need = sum(stages)
    have, where = device_memory(cfg.run.device)
    if need > have:
        batch = cfg.data.batch_size
        raise ConfigError(f"--batch-size {batch} needs about {need / GIB:.1f} GiB on {where} for {len(stages)} stage(s) "
                          f"(each block's {batch}x{batch} similarity matrices and activations) but it has "
                          f"{have / GIB:.1f} GiB: use a smaller --batch-size")
