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


def balanced_partition(compute: list[float], send: list[float], stages: int) -> tuple[int, ...]:
    """Contiguous split into `stages` groups that minimises the slowest group's time.

    A group [i..j] costs the compute of its blocks plus send[j], the cost of handing block j's output to the
    next stage (not paid by the last group). Exact dynamic programme over split points, O(stages * n^2).
    """
    n = len(compute)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot cut {n} blocks into {stages} stages")
    prefix = [0.0]
    for cost in compute:
        prefix.append(prefix[-1] + cost)

    def group(i: int, j: int) -> float:  # blocks i..j-1
        return prefix[j] - prefix[i] + (send[j - 1] if j < n else 0.0)

    # best[k][j]: slowest group when the first j blocks form k groups; choice[k][j]: where the last group starts
    infinity = float("inf")
    best = [[infinity] * (n + 1) for _ in range(stages + 1)]
    choice = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                candidate = max(best[k - 1][i], group(i, j))
                if candidate < best[k][j]:
                    best[k][j], choice[k][j] = candidate, i
    sizes, j = [], n
    for k in range(stages, 0, -1):
        i = choice[k][j]
        sizes.append(j - i)
        j = i
    return tuple(reversed(sizes))


def stage_times(compute: list[float], send: list[float], sizes: tuple[int, ...]) -> list[float]:
    """Estimated time per batch of each stage of a partition (compute plus the hand-off at its end)."""
    times, start = [], 0
    for k, size in enumerate(sizes):
        end = start + size
        times.append(sum(compute[start:end]) + (send[end - 1] if k < len(sizes) - 1 else 0.0))
        start = end
    return times
