"""Alignment: the angle between the update a training rule gives each layer and the true backprop gradient.

For each hidden block, on one batch: g_rule, the gradient the rule (local loss, FA, DFA or backprop) puts on the
block's layer weights, and g_bp, the gradient of the output cross-entropy backpropagated through the whole
network; the angle is arccos(<g_rule, g_bp> / |g_rule| |g_bp|), in degrees. 90 degrees is what a random direction
gives; a rule learns when its angles are clearly below that. Both are measured on copies of the blocks in train
mode (batch statistics) without dropout, so that training is untouched and both see the same function.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.block.blocks import Block, FeedbackTrained, HiddenBlock, head_loss
from pipeline.model.feedback import Conv2dFA, LinearFA, direct_feedback, output_error
from pipeline.block.precision import Precision


def measurement_copy(blocks: list[Block]) -> list[Block]:
    """Deep copies of the blocks without their optimizers, generators, loss scalers, non-finite watch or dropout,
    computing in fp32 whatever the run's --precision (the angles are those of the rule, not of its rounding)."""
    copies = []
    for block in blocks:
        kept = block.optimizer, block.generator, block.scaler, block.watch
        block.optimizer = block.generator = block.scaler = block.watch = None
        try:
            twin = copy.deepcopy(block)
        finally:
            block.optimizer, block.generator, block.scaler, block.watch = kept
        if isinstance(twin, HiddenBlock):
            twin.dropout = 0.0
        for module in twin.modules():  # a user's layers' dropout, too
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.p = 0.0
        twin.precision = Precision()
        twin.train()
        copies.append(twin)
    return copies


def _plain_layers(blocks: list[Block]) -> None:
    """Make FA layers ordinary ones (in place, on copies): their backward then carries the true gradient."""
    for block in blocks:
        for module in block.modules():
            if isinstance(module, LinearFA):
                module.__class__ = nn.Linear
            elif isinstance(module, Conv2dFA):
                module.__class__ = nn.Conv2d


def _weight_grads(blocks: list[Block]) -> list[torch.Tensor]:
    grads = []
    for block in blocks:
        weights = block.alignment_weights()  # the layer's weight (its whole layer for a user's block)
        grads.append(torch.cat([(torch.zeros_like(w) if w.grad is None else w.grad.detach()).flatten() for w in weights]))
    return grads


def backprop_gradients(blocks: list[Block], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Gradient of the output cross-entropy on each hidden block's layer weights, through the whole network."""
    net = measurement_copy(blocks)
    _plain_layers(net)
    *hidden, output = net
    for block in hidden:
        x = block(x)
    F.cross_entropy(output(x), y).backward()
    return _weight_grads(hidden)


def rule_gradients(blocks: list[Block], x: torch.Tensor, y: torch.Tensor, rule: str) -> list[torch.Tensor]:
    """Gradient the training rule puts on each hidden block's layer weights for this batch."""
    net = measurement_copy(blocks)
    *hidden, output = net
    if rule in ("backprop", "fa"):  # fa: the FA layers' backward uses their feedback weights
        for block in hidden:
            x = block(x)
        F.cross_entropy(output(x), y).backward()
    elif rule == "dfa":
        states = []
        for block in hidden:
            out = block(x)
            states.append(out)
            x = out.detach()
        error = output_error(output(x), y)
        for block, out in zip(hidden, states):
            assert isinstance(block, FeedbackTrained)
            out.backward(direct_feedback(error, block.feedback, out.shape))
    else:  # a local loss: each block's own heads
        for block in hidden:
            h = block.activation(x)
            loss, _ = head_loss(block.heads, h, y)
            loss.backward()
            x = block.emit(h).detach()
    return _weight_grads(hidden)


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle between two tensors seen as vectors; 90 when either is zero."""
    a, b = a.flatten().double(), b.flatten().double()
    norms = a.norm() * b.norm()
    if norms == 0:
        return 90.0
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b / norms)))))


def alignment_angles(blocks: list[Block], x: torch.Tensor, y: torch.Tensor, rule: str) -> list[float]:
    """Angle (degrees) between the rule's and backprop's gradient, for every hidden block, on one batch."""
    truth = backprop_gradients(blocks, x, y)
    given = rule_gradients(blocks, x, y, rule)
    return [angle_degrees(g, t) for g, t in zip(given, truth)]


class AlignmentLog:
    """Measures the angles on a few fixed held-out batches and keeps the records (and alignment.jsonl)."""

    def __init__(self, heldout: list[tuple[torch.Tensor, torch.Tensor]], rule: str, out_dir: str | None = None):
        if not heldout:
            raise ValueError("alignment needs at least one held-out batch")
        self.heldout, self.rule = heldout, rule
        self.records: list[dict] = []
        self.path = os.path.join(out_dir, "alignment.jsonl") if out_dir else None
        if self.path:
            os.makedirs(out_dir, exist_ok=True)
            open(self.path, "w").close()

    def measure(self, blocks: list[Block], step: int, epoch: int, epoch_end: bool = False) -> dict:
        """Mean angle per hidden layer over the held-out batches; recorded and returned."""
        per_batch = [alignment_angles(blocks, x, y, self.rule) for x, y in self.heldout]
        angles = [sum(column) / len(column) for column in zip(*per_batch)]
        record = {"step": step, "epoch": epoch, "epoch_end": epoch_end, "rule": self.rule,
                  "layers": [b.index for b in blocks[:-1]], "angles": angles}
        self.records.append(record)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record


def write_alignment_report(records: list[dict], out_dir: str) -> dict[str, str]:
    """alignment.json, alignment.csv and alignment.png (angle per layer over training steps) in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {kind: os.path.join(out_dir, f"alignment.{kind}") for kind in ("json", "csv", "png")}
    with open(paths["json"], "w") as f:
        json.dump(records, f, indent=1)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "epoch", "epoch_end", "rule", "layer", "angle_degrees"])
        for r in records:
            for layer, angle in zip(r["layers"], r["angles"]):
                writer.writerow([r["step"], r["epoch"], r["epoch_end"], r["rule"], layer, f"{angle:.4f}"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for position, layer in enumerate(records[0]["layers"]):
        ax.plot([r["step"] for r in records], [r["angles"][position] for r in records], marker=".", label=f"layer {layer}")
    ax.axhline(90, color="grey", linestyle="--", linewidth=1, label="random direction")
    ax.set(xlabel="training step", ylabel="angle to the backprop gradient (degrees)", ylim=(0, 100),
           title=f"{records[0]['rule']}: alignment per hidden layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths
