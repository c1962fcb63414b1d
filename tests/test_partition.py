"""Partitions: contiguous, complete, as even as possible, explicit sizes honoured."""

import pytest
import torch

from pipeline.partition import even_partition, resolve_partition, stage_ranges


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
    from pipeline.partition import balanced_partition, stage_times

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

    from pipeline.partition import balanced_partition, stage_times

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
    from pipeline.profile import send_path

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert send_path(cpu, "dist", "gloo") == "host" and send_path(cpu, "local", None) == "host"
    assert send_path(gpu, "zmq", None) == "host"  # staged through pinned host memory
    assert send_path(gpu, "dist", "gloo") == "host"  # the one-GPU emulation over gloo
    assert send_path(gpu, "dist", "nccl") == "peer"
    assert send_path(gpu, "local", None) == "host"  # the local transport stages through shared memory
