"""The per-device memory model of the budget projection: what each schedule holds at once."""

from benchmarks.budget_projection import local_memory, peer_memory

BLOCK = {"saved": {"layer": 100, "heads": 50}, "parameter_bytes": 10, "input_bytes": 8, "output_bytes": 4}


def test_gpipe_holds_every_micro_batch_and_1f1b_only_those_in_flight():
    blocks = [BLOCK] * 4
    # GPipe keeps all M micro-batches' graphs until the backward: the whole batch's, whatever M
    assert peer_memory(blocks, [2, 2], 8, 2, "gpipe") == [4 * 20 + 200 + 4] * 2
    assert peer_memory(blocks, [2, 2], 1, 2, "gpipe") == [4 * 20 + 200 + 4] * 2
    # 1F1B: stage k holds min(M, K - k) of M: 2 of 8 on stage 0, 1 of 8 on stage 1
    assert peer_memory(blocks, [2, 2], 8, 2, "1f1b") == [80 + 200 * 2 / 8 + 4 * 2 / 8, 80 + 200 / 8 + 4 / 8]


def test_a_lean_local_stage_holds_one_block_graph_at_the_whole_batch():
    bigger = {**BLOCK, "saved": {"layer": 300, "heads": 20}}
    # the largest block's layer + heads, not their sum (the input among what the layer saves); one block's gradients
    # at a time; the output message at the whole batch
    assert local_memory([BLOCK, bigger, BLOCK], [2, 1]) == [3 * 20 + 10 + 320 + 4, 3 * 10 + 10 + 150 + 4]
