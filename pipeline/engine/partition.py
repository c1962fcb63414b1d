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


def resolve_partition(num_blocks: int, stages: int, entries: tuple | None) -> list[range]:
    """The blocks every stage builds: the explicit partition if given (halves allowed), else an even split."""
    return resolve_placement(num_blocks, stages, entries).ranges


def resolve_placement(num_blocks: int, stages: int, entries: tuple | None) -> Placement:
    """The placement of the explicit partition entries (checked against the block and stage counts; see
    Placement.parse), else the even split."""
    placement = Placement(even_partition(num_blocks, stages)) if entries is None else Placement.parse(entries)
    if len(placement.sizes) != stages or sum(placement.sizes) != num_blocks:
        raise ValueError(f"partition {placement.text} does not cut {num_blocks} blocks into {stages} non-empty stages")
    return placement


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


# ---- split heads: a block's layer on one stage, its local heads on a neighbouring one -----------------------
#
# A partition may count halves: 1.5,2.5 puts block 0 and block 1's layer on stage 0, block 1's heads and blocks
# 2 and 3 on stage 1. The stage with the layer sends the block's activation h on with the batch; the heads'
# stage sends dL/dh back (pipeline/engine/remote_heads.py). A half marked h puts the heads first: 1.5h,2.5 puts block 0
# and block 1's heads on stage 0, block 1's layer and blocks 2 and 3 on stage 1; the layer's stage sends h back
# to the heads, which send dL/dh on (pipeline/engine/upstream_heads.py). Such a split is the only one of its two stages.


@dataclass(frozen=True)
class Placement:
    """Where every block's layer and heads run: sizes per stage, in blocks, halves allowed, and the stage
    boundaries k (between stage k and k+1) whose split block has its heads on the earlier stage (see above)."""

    sizes: tuple[float, ...]
    heads_first: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        halves = [2 * s for s in self.sizes]
        if any(h != int(h) or h < 1 for h in halves):
            raise ValueError(f"partition {self.text}: sizes are whole or half blocks, at least a half")
        ends = [end for _, end in self.bounds[:-1]]
        for k in self.heads_first:
            if not 0 <= k < len(ends) or ends[k] % 2 == 0:
                raise ValueError(f"partition {self.text}: an h goes on a stage that ends inside a block (its sizes so "
                                 f"far add up to a half) and is not the last; stage {k} is not one")
            if (k > 0 and ends[k - 1] % 2) or (k + 1 < len(ends) and ends[k + 1] % 2):
                raise ValueError(f"partition {self.text}: a block with its heads first ({k}h) must be the only split "
                                 f"block of both its stages (a stage has one remote-gradient link in, and each link out "
                                 f"carries all it sends: pipeline/engine/simulate.py, link_faults)")

    @classmethod
    def parse(cls, entries) -> Placement:
        """A placement from partition entries: numbers, or strings like "1.5h" for a half that holds the heads."""
        sizes, first = [], set()
        for k, entry in enumerate(entries):
            if isinstance(entry, str):
                if not entry.endswith("h"):
                    raise ValueError(f"partition entry '{entry}': a number, or a half followed by h (1.5h)")
                first.add(k)
                entry = entry[:-1]
            sizes.append(float(entry))
        return cls(tuple(int(s) if s.is_integer() else s for s in sizes), frozenset(first))

    @property
    def entries(self) -> tuple:
        """The sizes as --partition writes them: numbers, "1.5h" for a half that holds a block's heads."""
        return tuple(f"{s:g}h" if k in self.heads_first else s for k, s in enumerate(self.sizes))

    @property
    def text(self) -> str:
        return ",".join(e if isinstance(e, str) else f"{e:g}" for e in self.entries)

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """(start, end) of every stage in half-blocks: block i is halves 2i and 2i+1."""
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
        """Blocks whose layer and heads run on two stages."""
        return frozenset(end // 2 for _, end in self.bounds[:-1] if end % 2)

    def part(self, rank: int, index: int) -> str:
        """What stage `rank` runs of block `index`: "whole", "layer" or "heads"."""
        start, end = self.bounds[rank]
        if index * 2 < start:  # the second half of a block split at the boundary before this stage
            return "layer" if rank - 1 in self.heads_first else "heads"
        if 2 * index + 2 > end:  # the first half of a block split at this stage's end
            return "heads" if rank in self.heads_first else "layer"
        return "whole"

    def partner(self, rank: int, index: int) -> int | None:
        """The stage that runs the other half of block `index`, split with stage `rank`; None if it is whole here."""
        start, end = self.bounds[rank]
        if index * 2 < start:
            return rank - 1
        return rank + 1 if 2 * index + 2 > end else None

    def gradient_links(self) -> list[tuple[int, int]]:
        """(sender, receiver) of every remote-gradient link: dL/dh from the heads' stage to the layer's, and where
        the heads come first, h from the layer's stage back to theirs."""
        links = []
        for k, (_, end) in enumerate(self.bounds[:-1]):
            if end % 2:
                links += [(k + 1, k), (k, k + 1)] if k in self.heads_first else [(k + 1, k)]
        return links


def format_sizes(sizes) -> str:
    return ",".join(s if isinstance(s, str) else f"{s:g}" for s in sizes)


def as_sizes(halves: list[int]) -> tuple[float, ...]:
    """Sizes from counts of half-blocks: whole blocks as ints (so JSON and messages show 2, not 2.0)."""
    return tuple(h // 2 if h % 2 == 0 else h / 2 for h in halves)


def split_chain(layer: list[float], heads: list[float], send: list[float], send_h: list[float], index: int,
                heads_first: bool) -> float:
    """The least time per batch of block `index` split over two stages in the exact schedule, whatever else its
    stages hold: its layer's forward of t+1 needs the update of t, which needs dL/dh of t, which needs the heads'
    loss of t, which needs h of t, so layer, heads and the messages between them run one after another
    (heads last: out and h on, dL/dh back; heads first: h back, dL/dh on)."""
    messages = 2 * send_h[index] if heads_first else send[index] + 2 * send_h[index]
    return layer[index] + heads[index] + messages


def balanced_placement(layer: list[float], heads: list[float], send: list[float], send_h: list[float],
                       splittable: list[bool], stages: int, margin: float = 0.02,
                       exact: bool = True) -> tuple[Placement, list[float]]:
    """The placement (halves allowed, heads first or last) whose slowest stage is fastest, and its stage times.

    A stage runs from one cut to the next. A cut falls between blocks, or inside a `splittable` block i: after
    its layer (the heads on the next stage) or, for i > 0, after its heads (the layer on the next stage, heads
    first; for block 0 the input's send is not profiled, so 0.5h is left to an explicit --partition). A
    stage pays for what it hands on: send[j] for block j's output after a whole block j or block j's layer (plus
    send_h[j], h goes on with it), send[j-1] + send_h[j] before block j's layer (the heads first: dL/dh goes on);
    a stage that starts inside block i pays send_h[i] (dL/dh back, or h back). A stage with its heads first
    holds no other split half. Exact dynamic programme over the cuts; a split placement is chosen only if its
    slowest stage beats the best whole-block one by more than `margin` (a split costs a message each way that
    the estimate does not see). `exact` (no --heads-max-delay): a stage that ends inside a block takes at least
    the split block's serial chain (split_chain), so a split never looks faster than it can run.
    """
    n = len(layer)
    cuts = [(0, "")]  # (half-block position, "" between blocks, "L" after a layer, "H" after the heads)
    for i in range(n):
        if splittable[i]:
            cuts += [(2 * i + 1, "L")] + ([(2 * i + 1, "H")] if i > 0 else [])
        cuts.append((2 * i + 2, ""))

    def cost(a: tuple[int, str], b: tuple[int, str]) -> float:
        (p, kind_a), (q, kind_b) = a, b
        if q <= p or (kind_a == "H" and q % 2) or (kind_b == "H" and p % 2):
            return float("inf")
        time = 0.0
        for half in range(p, q):
            i = half // 2
            first_is_layer = not ((half == p and kind_a == "H") or (half == q - 1 and kind_b == "H"))
            is_layer = (half % 2 == 0) == first_is_layer
            time += layer[i] if is_layer else heads[i]
        if p % 2:
            time += send_h[p // 2]
        j = q // 2
        if q < 2 * n:
            time += send[j - 1] if kind_b == "" else send[j] + send_h[j] if kind_b == "L" else send[j - 1] + send_h[j]
        if exact and kind_b:
            time = max(time, split_chain(layer, heads, send, send_h, j, kind_b == "H"))
        return time

    def best_of(candidates: list[tuple[int, str]]) -> tuple[list[tuple[int, str]], list[float]]:
        """The cuts (first and last included) through `candidates` into `stages` groups with the fastest slowest."""
        m, infinity = len(candidates), float("inf")
        best = [[infinity] * m for _ in range(stages + 1)]
        choice = [[0] * m for _ in range(stages + 1)]
        best[0][0] = 0.0
        for k in range(1, stages + 1):
            for j in range(1, m):
                for i in range(j):
                    value = max(best[k - 1][i], cost(candidates[i], candidates[j]))
                    if value < best[k][j]:
                        best[k][j], choice[k][j] = value, i
        path, j = [m - 1], m - 1
        for k in range(stages, 0, -1):
            j = choice[k][j]
            path.append(j)
        path = [candidates[j] for j in reversed(path)]
        return path, [cost(a, b) for a, b in zip(path, path[1:])]

    if stages > 2 * n:
        raise ValueError(f"cannot cut {n} blocks into {stages} stages")
    mixed, mixed_times = best_of(cuts)
    if max(mixed_times) == float("inf"):
        raise ValueError(f"cannot cut {n} blocks, {sum(splittable)} of them splittable, into {stages} stages")
    placement = Placement(as_sizes([q - p for (p, _), (q, _) in zip(mixed, mixed[1:])]),
                          frozenset(k for k, (_, kind) in enumerate(mixed[1:-1]) if kind == "H"))
    if stages > n:
        return placement, mixed_times
    whole_compute = [a + b for a, b in zip(layer, heads)]
    whole = balanced_partition(whole_compute, send, stages)
    whole_times = stage_times(whole_compute, send, whole)
    if max(mixed_times) < (1.0 - margin) * max(whole_times):
        return placement, mixed_times
    return Placement(whole), whole_times
