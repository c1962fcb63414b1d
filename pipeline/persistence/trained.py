"""A finished run back as a network: `pipeline.load(RUN_DIR)`, the `evaluate` command and early-exit prediction.

RUN_DIR is a run's --out: summary.json holds the resolved config, weights-stage*.pt each stage's blocks. The
network is rebuilt from the config (whatever stage count, transport or loss made it) on any device, and the
weights are put in; damaged or foreign files are a ConfigError (one line, exit 2), as checkpoints are.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from pipeline.block.blocks import Block, LocalBlock, evaluate_blocks
from pipeline.persistence.checkpoint import load_weights
from pipeline.run.resources import check_device
from pipeline.config import Config, ConfigError
from pipeline.data import BatchSource
from pipeline.observe.metrics import layer_errors
from pipeline.model.factories import build_blocks


class TrainedNetwork(nn.Module):
    """A trained block list in eval mode: images (B, C, H, W), normalised as the run's data, -> logits (B, classes).

    `local_classifiers(x)` gives every block's class scores (None for a block without a classifier; the output's
    logits last): with local learning every layer can answer.
    """

    def __init__(self, cfg: Config, blocks: list[Block]):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(blocks)
        self.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.float()

    @torch.no_grad()
    def local_classifiers(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        """Class scores (B, classes) of each block's local classifier, the output's logits last."""
        scores: list[torch.Tensor | None] = []
        for block in self.blocks:
            if isinstance(block, LocalBlock):
                h = block.activation(x)
                scores.append(_class_scores(block, h))
                x = block.emit(h)
            else:
                x = block(x)
                scores.append(x.float())
        return scores


def _class_scores(block: LocalBlock, h: torch.Tensor) -> torch.Tensor | None:
    """The fp32 scores whose argmax is the block's prediction, or None for a block whose heads do not classify."""
    scores = getattr(block.heads, "class_scores", None)
    if scores is None:
        return None
    with block.precision.autocast():
        return scores(h)


def _fail(run_dir: str, why: str) -> ConfigError:
    return ConfigError(f"{run_dir}: {why}")


def run_config(run_dir: str, device: str = "cpu", **data: object) -> Config:
    """A run's resolved config, set up to rebuild its network in one process on `device` (data fields overridable)."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            values = json.load(f)["config"]
        # the network in one process on `device`, tied to none of the run's processes, links or outputs (its
        # checkpoints, key files, TensorBoard folder): what this machine offers is judged where a run starts
        # (pipeline/run/resources.py), so a run from another machine loads here
        values["run"].update(device=device, out=None, resume=False, auto_resume=False, max_restarts=0, checkpoint_dir=None,
                             checkpoint_every=None, log_alignment=None, progress=False, tensorboard=None)
        values["pipeline"].update(stages=1, partition=None, transport="dist", zmq_curve_keys=None, dfa_sync=False,
                                  dist_backend="auto")
        values["data"].update({k: v for k, v in data.items() if v is not None})
        cfg = Config.from_dict(values)
    except OSError as exc:
        raise _fail(run_dir, f"no readable summary.json of a finished run ({exc.strerror or exc})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise _fail(run_dir, f"summary.json holds no config of this project ({type(exc).__name__}: {exc})") from None
    check_device(cfg)  # the device asked for here is on this machine and supports the run's precision
    return cfg


def read_weights(run_dir: str) -> dict[int, dict[str, torch.Tensor]]:
    """Every block's weights from the run's weights-stage*.pt files, each checked to be a block -> state dict."""
    if not glob.glob(os.path.join(run_dir, "weights-stage*.pt")):
        raise _fail(run_dir, "no weights-stage*.pt (was the run given --out, and did it finish?)")
    return load_weights(run_dir)


def load(run_dir: str, device: str = "cpu") -> TrainedNetwork:
    """Rebuild a finished run's network on `device`, in eval mode, with its trained weights."""
    return _load(run_config(run_dir, device), run_dir)


def _load(cfg: Config, run_dir: str) -> TrainedNetwork:
    shape, classes = BatchSource.shape_of(cfg.data)
    blocks = build_blocks(cfg, shape, classes, device=cfg.run.device)
    weights = read_weights(run_dir)
    if sorted(weights) != [b.index for b in blocks]:
        raise _fail(run_dir, f"weights of blocks {sorted(weights)}, but its config has {len(blocks)} blocks")
    for block in blocks:
        try:
            block.load_state_dict(weights[block.index])
        except RuntimeError as exc:
            raise _fail(run_dir, f"the weights of block {block.index} do not fit its config's network "
                                 f"({str(exc).splitlines()[-1].strip()[:160]})") from None
    return TrainedNetwork(cfg, blocks)


@dataclass
class Evaluation:
    """Test errors (percent) of every block's classifier (None without one; the output last), early-exit results."""

    layer_test_errors: list[float | None]
    examples: int
    early_exit: list[dict[str, float]]


def evaluate(run_dir: str, device: str = "cpu", thresholds: Iterable[float] = (), **data: object) -> Evaluation:
    """Score a run's network on its test split as training scored it, and early exit at each threshold."""
    cfg = run_config(run_dir, device, **data)
    net = _load(cfg, run_dir)
    thresholds = list(thresholds)
    totals: list[torch.Tensor | None] = [None] * len(net.blocks)
    exits = [[0, 0] for _ in thresholds]  # correct, depth summed
    examples = 0
    for batch in BatchSource(cfg.data, cfg.run.seed, device).eval_batches():
        _, hits = evaluate_blocks(list(net.blocks), batch.x, batch.y)  # the training's own evaluation path
        totals = [h if t is None else t + h for t, h in zip(totals, hits)]
        examples += len(batch.y)
        if thresholds:
            scores = net.local_classifiers(batch.x)
            for counts, threshold in zip(exits, thresholds):
                correct, depth = early_exit(scores, batch.y, threshold)
                counts[0] += correct
                counts[1] += depth
    errors = layer_errors([None if t is None else int(t) for t in totals], examples)
    results = [{"threshold": t, "accuracy": 100.0 * c / examples, "average_depth": d / examples, "blocks": len(net.blocks)}
               for t, (c, d) in zip(thresholds, exits)]
    return Evaluation(errors, examples, results)


def early_exit(scores: list[torch.Tensor | None], labels: torch.Tensor, threshold: float) -> tuple[int, int]:
    """Each example answered by the first block whose classifier's softmax confidence is >= threshold (the output
    answers the rest): (correct answers, blocks computed summed over the examples)."""
    answered = torch.zeros_like(labels, dtype=torch.bool)
    prediction = torch.zeros_like(labels)
    depth = torch.zeros_like(labels)
    for index, score in enumerate(scores):
        if score is None:
            continue
        confidence, guess = score.softmax(1).max(1)
        take = ~answered & ((confidence >= threshold) | (index == len(scores) - 1))
        prediction[take], depth[take] = guess[take], index + 1
        answered |= take
    return int((prediction == labels).sum()), int(depth.sum())


def report(evaluation: Evaluation) -> str:
    """The evaluate command's table."""
    lines = [f"{'layer':>6}  test error ({evaluation.examples} examples)"]
    for index, error in enumerate(evaluation.layer_test_errors):
        name = "output" if index == len(evaluation.layer_test_errors) - 1 else str(index)
        lines.append(f"{name:>6}  {'-' if error is None else f'{error:.2f}%'}")
    for result in evaluation.early_exit:
        lines.append(f"early exit at confidence >= {result['threshold']:g}: accuracy {result['accuracy']:.2f}%, "
                     f"average depth {result['average_depth']:.2f} of {result['blocks']} blocks")
    return "\n".join(lines)
