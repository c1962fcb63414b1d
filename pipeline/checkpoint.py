"""Trained weights on disk: each process saves the blocks it holds; loading merges them by block index."""

from __future__ import annotations

import glob
import os

import torch

from pipeline.blocks import Block


def save_weights(out_dir: str, blocks: list[Block], stage: int) -> str:
    """Write {block index: state dict} of a stage's blocks to out_dir/weights-stage{stage}.pt (atomically)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"weights-stage{stage}.pt")
    state = {block.index: {k: v.detach().cpu() for k, v in block.state_dict().items()} for block in blocks}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def load_weights(out_dir: str) -> dict[int, dict[str, torch.Tensor]]:
    """All blocks' weights saved under out_dir, whatever the number of stages that wrote them."""
    merged: dict[int, dict[str, torch.Tensor]] = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "weights-stage*.pt"))):
        merged.update(torch.load(path, weights_only=True))
    return dict(sorted(merged.items()))
