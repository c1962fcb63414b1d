"""Partition: which contiguous blocks (or halves of a block: its layer, its heads) each stage holds; pure functions."""

from __future__ import annotations

from dataclasses import dataclass


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


def resolve_partition(num_blocks: int, stages: int, sizes: tuple[float, ...] | None) -> list[range]:
    """The blocks every stage builds: the explicit sizes if given (halves allowed), else an even split."""
    return resolve_placement(num_blocks, stages, sizes).ranges


def resolve_placement(num_blocks: int, stages: int, sizes: tuple[float, ...] | None) -> Placement:
    """The placement of the explicit sizes (checked against the block and stage counts), else the even split."""
    if sizes is None:
        sizes = even_partition(num_blocks, stages)
    if len(sizes) != stages or sum(sizes) != num_blocks or min(sizes) < 0.5:
        raise ValueError(f"partition {sizes} does not cut {num_blocks} blocks into {stages} non-empty stages")
    return Placement(tuple(sizes))


def balanced_partition(compute: list[float], send: list[float], stages: int,
                       start: list[float] | None = None) -> tuple[int, ...]:
    """Contiguous split into `stages` groups that minimises the slowest group's time.

    A group [i..j] costs the compute of its blocks plus send[j], the cost of handing block j's output to the
    next stage (not paid by the last group), plus start[i] if given (not paid by the first group). Exact
    dynamic programme over split points, O(stages * n^2).
    """
    n = len(compute)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot cut {n} blocks into {stages} stages")
    prefix = [0.0]
    for cost in compute:
        prefix.append(prefix[-1] + cost)

    def group(i: int, j: int) -> float:  # blocks i..j-1
        return prefix[j] - prefix[i] + (send[j - 1] if j < n else 0.0) + (start[i] if start and i > 0 else 0.0)

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


def stage_times(compute: list[float], send: list[float], sizes: tuple[int, ...],
                start: list[float] | None = None) -> list[float]:
    """Estimated time per batch of each stage of a partition (compute plus the hand-off at its end, plus start[i]
    for a stage that begins at item i > 0 if given)."""
    times, begin = [], 0
    for k, size in enumerate(sizes):
        end = begin + size
        times.append(sum(compute[begin:end]) + (send[end - 1] if k < len(sizes) - 1 else 0.0)
                     + (start[begin] if start and begin > 0 else 0.0))
        begin = end
    return times


# ---- split heads: a block's layer on one stage, its local heads on the next --------------------------------
#
# A partition may count halves: 1.5,2.5 puts block 0 and block 1's layer on stage 0, block 1's heads and
# blocks 2 and 3 on stage 1. The stage with the layer sends the block's activation h on with the batch; the
# heads' stage sends dL/dh back (pipeline/remote_heads.py).


@dataclass(frozen=True)
class Placement:
    """Where every block's layer and heads run: sizes per stage, in blocks, halves allowed (see above)."""

    sizes: tuple[float, ...]

    def __post_init__(self) -> None:
        halves = [2 * s for s in self.sizes]
        if any(h != int(h) or h < 1 for h in halves):
            raise ValueError(f"partition {format_sizes(self.sizes)}: sizes are whole or half blocks, at least a half")

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """(start, end) of every stage in half-blocks: block i's layer is half 2i, its heads half 2i+1."""
        bounds, start = [], 0
        for size in self.sizes:
            end = start + int(2 * size)
            bounds.append((start, end))
            start = end
        return bounds

    @property
    def ranges(self) -> list[range]:
        """The blocks each stage builds (a split block on both of its stages)."""
        return [range(start // 2, (end + 1) // 2) for start, end in self.bounds]

    @property
    def split(self) -> frozenset[int]:
        """Blocks whose heads run on the stage after their layer's."""
        return frozenset(end // 2 for _, end in self.bounds[:-1] if end % 2)

    def part(self, rank: int, index: int) -> str:
        """What stage `rank` runs of block `index`: "whole", "layer" or "heads"."""
        start, end = self.bounds[rank]
        if index * 2 < start:
            return "heads"
        return "layer" if 2 * index + 2 > end else "whole"

    def gradient_links(self) -> list[tuple[int, int]]:
        """(sender, receiver) of every remote-gradient link: the heads' stage to the layer's."""
        return [(k + 1, k) for k, (_, end) in enumerate(self.bounds[:-1]) if end % 2]


def format_sizes(sizes) -> str:
    return ",".join(f"{s:g}" for s in sizes)


def as_sizes(halves: list[int]) -> tuple[float, ...]:
    """Sizes from counts of half-blocks: whole blocks as ints (so JSON and messages show 2, not 2.0)."""
    return tuple(h // 2 if h % 2 == 0 else h / 2 for h in halves)


def balanced_placement(layer: list[float], heads: list[float], send: list[float], send_h: list[float],
                       splittable: list[bool], stages: int, margin: float = 0.02) -> tuple[tuple[float, ...], list[float]]:
    """The placement (sizes, halves allowed) whose slowest stage is fastest, and its estimated stage times.

    Every block is one item (layer and heads together), or two where it is `splittable`. A cut after a block's
    layer costs its stage send + send_h (the activation h goes on with the batch) and the heads' stage send_h
    (dL/dh comes back); a cut after a whole block costs send. Exact dynamic programme over the item boundaries;
    a split placement is chosen only if its slowest stage beats the best whole-block one by more than `margin`
    (a split costs a message each way that the estimate does not see).
    """
    whole_compute = [a + b for a, b in zip(layer, heads)]
    whole = balanced_partition(whole_compute, send, stages) if stages <= len(layer) else None
    items = []  # (compute, half-blocks, cost of a cut after it, cost of a stage that starts at it)
    for i in range(len(layer)):
        if splittable[i]:
            items += [(layer[i], 1, send[i] + send_h[i], 0.0), (heads[i], 1, send[i], send_h[i])]
        else:
            items.append((layer[i] + heads[i], 2, send[i], 0.0))
    compute = [item[0] for item in items]
    cut = [item[2] for item in items]
    start = [item[3] for item in items]
    mixed = balanced_partition(compute, cut, stages, start)
    halves, end = [], 0
    for size in mixed:
        halves.append(sum(item[1] for item in items[end:end + size]))
        end += size
    mixed_times = stage_times(compute, cut, mixed, start)
    if whole is None:
        return as_sizes(halves), mixed_times
    whole_times = stage_times(whole_compute, send, whole)
    if max(mixed_times) < (1.0 - margin) * max(whole_times):
        return as_sizes(halves), mixed_times
    return whole, whole_times
