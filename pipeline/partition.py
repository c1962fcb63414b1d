"""Partition: which contiguous blocks each stage holds (pure functions, no processes)."""

from __future__ import annotations


def even_partition(num_blocks: int, stages: int) -> tuple[int, ...]:
    """Sizes of `stages` contiguous groups of `num_blocks` blocks, differing by at most one, larger first."""
    if not 1 <= stages <= num_blocks:
        raise ValueError(f"cannot cut {num_blocks} blocks into {stages} stages")
    base, extra = divmod(num_blocks, stages)
    return tuple(base + 1 if k < extra else base for k in range(stages))


def stage_ranges(sizes: tuple[int, ...]) -> list[range]:
    """Block indices of each stage for a partition given as sizes, e.g. (2, 1, 1) -> [0..1], [2], [3]."""
    ranges, start = [], 0
    for size in sizes:
        ranges.append(range(start, start + size))
        start += size
    return ranges


def resolve_partition(num_blocks: int, stages: int, sizes: tuple[int, ...] | None) -> list[range]:
    """The block ranges of every stage: the explicit sizes if given, else an even split."""
    if sizes is None:
        sizes = even_partition(num_blocks, stages)
    if len(sizes) != stages or sum(sizes) != num_blocks or min(sizes) < 1:
        raise ValueError(f"partition {sizes} does not cut {num_blocks} blocks into {stages} non-empty stages")
    return stage_ranges(tuple(sizes))
