"""Partitions: contiguous, complete, as even as possible, explicit sizes honoured."""

import pytest
import torch

from pipeline.engine.partition import even_partition, resolve_partition, stage_ranges


@pytest.mark.parametrize("blocks,stages,sizes", [(4, 1, (4,)), (4, 2, (2, 2)), (4, 3, (2, 1, 1)), (8, 3, (3, 3, 2)), (4, 4, (1, 1, 1, 1))])
def test_even_partition(blocks, stages, sizes):
    assert even_partition(blocks, stages) == sizes


def test_ranges_are_contiguous_and_cover_every_block_once():
    ranges = resolve_partition(7, 3, (1, 4, 2))
    assert [list(r) for r in ranges] == [[0], [1, 2, 3, 4], [5, 6]]
    assert stage_ranges((2, 2)) == [range(0, 2), range(2, 4)]


@pytest.mark.parametrize("sizes", [(1, 1), (2, 3), (0, 4), (5, -1)])
def test_bad_explicit_partitions_are_refused(sizes):
    with pytest.raises(ValueError):
        resolve_partition(4, 2, sizes)


def test_more_stages_than_blocks_is_refused():
    with pytest.raises(ValueError):
        even_partition(3, 4)


def test_balanced_partition_minimises_the_slowest_stage():
    from pipeline.engine.partition import balanced_partition, stage_times

    compute = [8.0, 1.0, 1.0, 1.0, 1.0, 4.0]
    send = [0.0] * 6
    sizes = balanced_partition(compute, send, 2)
    assert sizes == (1, 5) and max(stage_times(compute, send, sizes)) == 8.0
    assert balanced_partition([1.0] * 4, [0.0] * 4, 2) == (2, 2)
    # a costly hand-off moves the cut away from that block
    assert balanced_partition([2.0, 2.0, 2.0, 2.0], [0.0, 5.0, 0.0, 0.0], 2) in ((1, 3), (3, 1))


def test_balanced_partition_agrees_with_exhaustive_search():
    import itertools
    import random

    from pipeline.engine.partition import balanced_partition, stage_times

    rng = random.Random(0)
    for _ in range(50):
        n, k = rng.randint(2, 8), rng.randint(1, 4)
        if k > n:
            continue
        compute = [rng.uniform(0, 10) for _ in range(n)]
        send = [rng.uniform(0, 3) for _ in range(n)]
        best = min(max(stage_times(compute, send, c)) for c in (
            tuple(b - a for a, b in zip((0,) + cuts, cuts + (n,))) for cuts in itertools.combinations(range(1, n), k - 1)))
        assert max(stage_times(compute, send, balanced_partition(compute, send, k))) == pytest.approx(best)


def test_the_send_is_priced_along_the_transports_path():
    from pipeline.engine.profile import send_path

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert send_path(cpu, "dist", "gloo") == "host" and send_path(cpu, "local", None) == "host"
    assert send_path(gpu, "zmq", None) == "host"  # staged through pinned host memory
    assert send_path(gpu, "dist", "gloo") == "host"  # the one-GPU emulation over gloo
    assert send_path(gpu, "dist", "nccl") == "peer"
    assert send_path(gpu, "local", None) == "host"  # the local transport stages through shared memory


def test_a_half_in_the_partition_splits_a_block_between_two_stages():
    from pipeline.engine.partition import Placement

    placement = Placement((1.5, 1, 1.5))  # block 1's layer on stage 0, heads on 1; block 2's layer on 1, heads on 2
    assert placement.ranges == [range(0, 2), range(1, 3), range(2, 4)]
    assert placement.split == {1, 2} and placement.gradient_links() == [(1, 0), (2, 1)]
    assert [[placement.part(k, i) for i in r] for k, r in enumerate(placement.ranges)] == [
        ["whole", "layer"], ["heads", "layer"], ["heads", "whole"]]
    alone = Placement((0.5, 0.5, 3))  # block 0's layer alone, then its heads alone
    assert alone.ranges == [range(0, 1), range(0, 1), range(1, 4)] and alone.split == {0}
    assert alone.part(0, 0) == "layer" and alone.part(1, 0) == "heads" and alone.gradient_links() == [(1, 0)]
    assert Placement((2, 2)).split == frozenset() and Placement((2, 2)).gradient_links() == []
    with pytest.raises(ValueError):
        Placement((1.25, 2.75))
    assert [list(r) for r in resolve_partition(4, 2, (1.5, 2.5))] == [[0, 1], [1, 2, 3]]


def test_an_h_puts_a_split_blocks_heads_on_the_earlier_stage():
    from pipeline.engine.partition import Placement

    placement = Placement.parse(("1.5h", 2.5))  # block 1's heads on stage 0 with block 0, its layer on stage 1
    assert placement.sizes == (1.5, 2.5) and placement.heads_first == {0} and placement.text == "1.5h,2.5"
    assert placement.entries == ("1.5h", 2.5) and placement.ranges == [range(0, 2), range(1, 4)]
    assert [[placement.part(k, i) for i in r] for k, r in enumerate(placement.ranges)] == [["whole", "heads"], ["layer", "whole", "whole"]]
    assert placement.partner(0, 1) == 1 and placement.partner(1, 1) == 0 and placement.partner(1, 2) is None
    assert placement.gradient_links() == [(1, 0), (0, 1)]  # h back to the heads, dL/dh on to the layer
    assert Placement.parse((1, "1.5h", 1.5)).gradient_links() == [(2, 1), (1, 2)]
    assert Placement.parse(["0.5h", 3.5]).part(0, 0) == "heads" and Placement.parse(["0.5h", 3.5]).part(1, 0) == "layer"
    for bad in (("1h", 3), ("1.5h", "2.5h"), ("1.5h", 1, 1.5), (1.5, "1h", 1.5), ("1.5x", 2.5)):
        with pytest.raises(ValueError):
            Placement.parse(bad)  # an h on a whole boundary, on the last stage, or beside another split; not a size


def _placement_time(placement, layer, heads, send, send_h, splittable, exact=False):
    """Slowest stage of a placement, priced independently of balanced_placement (None if it splits a block that
    cannot be split); `exact`: a split block also takes its layer, its heads and the messages between them in turn."""
    times = []
    bounds, first = placement.bounds, placement.heads_first
    for k, (start, end) in enumerate(bounds):
        if (start % 2 and not splittable[start // 2]) or (end % 2 and not splittable[end // 2]):
            return None
        time = 0.0
        for h in range(start, end):
            is_heads = h % 2 == 1
            if (h == start and h % 2 and k - 1 in first) or (h == end - 1 and end % 2 and k in first):
                is_heads = not is_heads  # a heads-first block: its heads are the earlier stage's half
            time += heads[h // 2] if is_heads else layer[h // 2]
        if k < len(bounds) - 1:
            j = end // 2
            time += (send[j - 1] + send_h[j] if k in first else send[j] + send_h[j]) if end % 2 else send[j - 1]
        if start % 2:
            time += send_h[start // 2]
        if exact and end % 2 and k < len(bounds) - 1:
            i = end // 2
            time = max(time, layer[i] + heads[i] + (0 if k in first else send[i]) + 2 * send_h[i])
        times.append(time)
    return max(times)


def test_balanced_placement_agrees_with_exhaustive_search_and_splits_only_when_it_pays():
    import itertools
    import random

    from pipeline.engine.partition import Placement, as_sizes, balanced_placement

    rng = random.Random(1)
    seen_first = 0
    for _ in range(80):
        n, k = rng.randint(2, 6), rng.randint(1, 4)
        if k > 2 * n - 1:
            continue
        layer = [rng.uniform(0.1, 5) for _ in range(n)]
        heads = [rng.uniform(0, 10) for _ in range(n - 1)] + [0.0]
        send, send_h = [rng.uniform(0, 1) for _ in range(n)], [rng.uniform(0, 1) for _ in range(n)]
        splittable = [rng.random() < 0.8 for _ in range(n - 1)] + [False]
        candidates = []
        for cuts in itertools.combinations(range(1, 2 * n), k - 1):
            halves = [b - a for a, b in zip((0,) + cuts, cuts + (2 * n,))]
            odd = [i for i, c in enumerate(cuts) if c % 2 and c > 1]  # heads first: a block after the first
            for first in itertools.chain.from_iterable(itertools.combinations(odd, r) for r in range(len(odd) + 1)):
                try:
                    placement = Placement(as_sizes(halves), frozenset(first))
                except ValueError:  # a heads-first split beside another split
                    continue
                for exact in (False, True):
                    time = _placement_time(placement, layer, heads, send, send_h, splittable, exact)
                    if time is not None:
                        candidates.append((exact, time, any(h % 2 for h in halves)))
        if not candidates:
            continue
        for exact in (False, True):
            best = min(t for e, t, _ in candidates if e == exact)
            best_whole = min((t for e, t, split in candidates if e == exact and not split), default=float("inf"))
            placement, times = balanced_placement(layer, heads, send, send_h, splittable, k, margin=0.0, exact=exact)
            seen_first += bool(placement.heads_first) and not exact
            assert _placement_time(placement, layer, heads, send, send_h, splittable, exact) == pytest.approx(max(times))
            assert max(times) == pytest.approx(best if best < best_whole else best_whole)
    assert seen_first >= 5  # the search does pick heads-first placements
    # MLP-like costs (ms): the heads dominate and the third block's layer and heads straddle the middle
    layer, heads = [9.5, 11.7, 11.4, 1.9], [17.6, 17.6, 17.3, 0.0]
    placement, times = balanced_placement(layer, heads, [0.15] * 4, [0.08] * 3 + [0.0], [True] * 3 + [False], 2)
    assert placement.text == "1.5h,2.5"  # block 1's heads with block 0: 9.5 + 17.6 + 17.6 against 11.7 + 11.4 + 17.3 + 1.9
    assert max(times) == pytest.approx(9.5 + 17.6 + 17.6 + 0.15 + 0.08)
    # and the layer first where that balances better: 1 + 1 + 1 + 1 + 8 | 12 + 1, against 4 + 12 | 8 + 1 heads first
    placement, times = balanced_placement([1, 1, 8, 1], [1, 1, 12, 0], [0.1] * 4, [0.01] * 4, [True] * 3 + [False], 2,
                                          exact=False)
    assert placement.text == "2.5,1.5" and max(times) == pytest.approx(12 + 1 + 0.01)
    # ...which only a delayed update can run that fast: exactly, block 2's layer, heads, out and h on and dL/dh back
    # take 8 + 12 + 0.1 + 0.02 one after another; with its heads first, h back and dL/dh on, 8 + 12 + 0.02, which is
    # still a little faster than whole blocks (1 + 1 + 1 + 1 | 8 + 12 + 1)
    placement, times = balanced_placement([1, 1, 8, 1], [1, 1, 12, 0], [0.1] * 4, [0.01] * 4, [True] * 3 + [False], 2)
    assert placement.text == "2.5h,1.5" and max(times) == pytest.approx(8 + 12 + 0.02)
    # a split that gains less than the margin is not worth its extra messages: whole blocks
    placement, _ = balanced_placement([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0], [0.0] * 4, [0.01] * 4, [True] * 3 + [False], 2)
    assert placement.sizes == (2, 2) and not placement.heads_first
