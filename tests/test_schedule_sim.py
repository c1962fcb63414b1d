"""The schedule simulator the projection uses: known closed forms, and orders that cannot deadlock."""

import pytest

from benchmarks.schedule_sim import gpipe_closed_form, one_f_one_b_order, step_time


def test_equal_stages_give_the_textbook_bubble():
    # K equal stages, M micro-batches, no sends: (M + K - 1) slots of forward and of backward, for both schedules
    for stages in (1, 2, 4, 8):
        for m in (1, 2, 4, 8, 32):
            f, b = [1.0] * stages, [2.0] * stages
            for schedule in ("gpipe", "1f1b"):
                assert step_time(schedule, f, b, [0.0] * stages, m) == pytest.approx(3.0 * (m + stages - 1))


def test_unequal_stages_follow_the_closed_form_and_sends_add_on_the_path():
    f, b = [1.0, 3.0, 1.0, 1.0], [1.0, 3.0, 2.0, 1.0]
    for m in (1, 2, 4, 8):
        assert step_time("gpipe", f, b, [0.0] * 4, m) == pytest.approx(gpipe_closed_form(f, b, m))
    # one micro-batch: everything in a line, every activation sent once and every gradient once
    assert step_time("gpipe", f, b, [0.5, 0.5, 0.5, 0.0], 1) == pytest.approx(sum(f) + sum(b) + 6 * 0.5)


def test_one_f_one_b_keeps_at_most_k_minus_stage_micro_batches_in_flight():
    for stages in (2, 4):
        for m in (stages, 2 * stages, 16):
            for k in range(stages):
                live = peak = 0
                for kind, _ in one_f_one_b_order(k, stages, m):
                    live += 1 if kind == "F" else -1
                    peak = max(peak, live)
                assert peak == min(m, stages - k)
