"""Trained weights on disk: each process saves the blocks it holds; loading merges them by block index."""

from __future__ import annotations

import glob
import math
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


def flatten_state(blocks: list[Block]) -> tuple[torch.Tensor, list[list]]:
    """The floating-point state of blocks as one float32 tensor and a manifest [[block index, name, shape], ...]
    (for sending a stage's weights in one frame; integer counters such as num_batches_tracked are left out)."""
    parts, manifest = [], []
    for block in blocks:
        for name, tensor in block.state_dict().items():
            if tensor.is_floating_point():
                parts.append(tensor.detach().float().reshape(-1))
                manifest.append([block.index, name, list(tensor.shape)])
    return torch.cat(parts), manifest


def unflatten_state(flat: torch.Tensor, manifest: list[list]) -> dict[int, dict[str, torch.Tensor]]:
    """Inverse of flatten_state: {block index: partial state dict}."""
    states: dict[int, dict[str, torch.Tensor]] = {}
    offset = 0
    for index, name, shape in manifest:
        size = math.prod(shape)
        states.setdefault(index, {})[name] = flat[offset:offset + size].view(shape)
        offset += size
    if offset != flat.numel():
        raise ValueError(f"state manifest describes {offset} values, the tensor has {flat.numel()}")
    return states
