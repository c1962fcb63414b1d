"""Partitions: contiguous, complete, as even as possible, explicit sizes honoured."""

import pytest

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
