"""Every placement's schedule, simulated against the others: no deadlock, updates in order, bounded buffers, the
overlap each exact schedule claims; and the checks caught on purpose-broken schedules."""

from __future__ import annotations

import itertools

import pytest

from pipeline.engine.partition import Placement
from pipeline.engine.schedule import Action, pipeline_schedules
from pipeline.engine.simulate import Deadlock, link_faults, ordering_faults, overlap_faults, simulate


def _unchecked(halves: tuple[int, ...], heads_first: frozenset[int]) -> Placement:
    """A Placement without the parser's check (to simulate the ones it refuses)."""
    placement = object.__new__(Placement)
    object.__setattr__(placement, "sizes", tuple(h // 2 if h % 2 == 0 else h / 2 for h in halves))
    object.__setattr__(placement, "heads_first", heads_first)
    return placement


def _placements(max_blocks: int = 5, max_stages: int = 4):
    """Every (placement, refused by the parser) up to max_stages stages and max_blocks blocks, halves and h included."""
    for blocks in range(2, max_blocks + 1):
        for stages in range(2, max_stages + 1):
            for cuts in itertools.combinations(range(1, 2 * blocks), stages - 1):
                halves = tuple(b - a for a, b in zip((0, *cuts), (*cuts, 2 * blocks)))
                odd = [k for k, end in enumerate(cuts) if end % 2]
                for r in range(len(odd) + 1):
                    for first in itertools.combinations(odd, r):
                        try:
                            Placement(_unchecked(halves, frozenset()).sizes, frozenset(first))
                            refused = False
                        except ValueError:
                            refused = True
                        yield _unchecked(halves, frozenset(first)), refused


def _check(schedules, delays: dict, batches: int = 8, capacity: int = 2) -> tuple[dict, dict]:
    trace = simulate(schedules, batches, capacity)
    assert ordering_faults(trace, delays) == []
    assert overlap_faults(trace, schedules, batches) == [], [[a.text() for a in s] for s in schedules]
    return trace.link_peak, trace.awaiting_peak


OPTIONS = [dict(), dict(lean=True), dict(heads_delay=1), dict(heads_delay=2, lean=True)]
CAPACITY = {0: 2, 1: 1, 2: 2, 3: 1}  # --queue-depth, by option (both depths, each stage order and delay seen once)


def test_every_accepted_placement_runs_in_order_with_bounded_buffers_and_its_overlap():
    accepted = refused = 0
    for placement, is_refused in _placements():
        schedules = pipeline_schedules(placement)
        if is_refused:  # the parser's refusal is the links' limit, which the simulator names
            assert link_faults(schedules), placement.text
            refused += 1
            continue
        assert link_faults(schedules) == [], placement.text
        accepted += 1
        for k, options in enumerate(OPTIONS):
            delay, capacity = options.get("heads_delay", 0), CAPACITY[k]
            delays = {"layer": delay, "layer_after": delay}
            schedules = pipeline_schedules(placement, **options)
            short, long = _check(schedules, delays, 8, capacity), _check(schedules, delays, 16, capacity)
            assert short == long, (placement.text, options)  # no buffer grows with the run's length
            # the queue's capacity; dL/dh or h of each batch not yet applied
            assert all(n <= max(capacity, delay + 1) for (_, _, what), n in short[0].items() if what not in ("END", "EVAL")), \
                (placement.text, options, short)
            assert all(n <= delay + 2 for n in short[1].values())  # batches awaiting a remote gradient
    assert accepted > 300 and refused > 0  # halves, h and 0.5-block stages all in


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("delay", [0, 1, 2, None])
def test_dfa_schedules_keep_their_delay(stages, delay):
    schedules = pipeline_schedules(Placement((1,) * stages), dfa=True, dfa_delay=delay)
    trace = simulate(schedules, 12)
    assert ordering_faults(trace, {"dfa": 10 ** 6 if delay is None else delay}) == []
    assert overlap_faults(trace, schedules, 12) == []
    if delay is not None:
        assert all(n <= delay + 1 for n in trace.awaiting_peak.values())


def _moved(schedules, rank: int, which: Action, before: Action) -> list[list[Action]]:
    """The schedules with `which` moved just before `before` on stage `rank`."""
    mine = [a for a in schedules[rank] if a != which]
    mine.insert(mine.index(before), which)
    return [mine if k == rank else s for k, s in enumerate(schedules)]


def test_a_layer_that_forwards_before_its_update_is_caught():
    schedules = pipeline_schedules(Placement.parse([1.5, 2.5]))
    apply = next(a for a in schedules[0] if a.op == "apply")
    broken = _moved(schedules, 0, Action("forward", "layer"), apply)  # the forward of t+1 before dL/dh of t
    faults = ordering_faults(simulate(broken, 8), {"layer": 0})
    assert faults and faults[0] == "stage 0: layer forwards batch 1 before the update of batch 0 is in"


def test_a_split_stage_that_waits_for_dl_dh_first_loses_its_overlap_and_is_caught():
    schedules = pipeline_schedules(Placement.parse([1.5, 2.5]))
    apply = next(a for a in schedules[0] if a.op == "apply")
    broken = _moved(schedules, 0, apply, Action("forward", "blocks"))  # wait for dL/dh at the top of every step
    trace = simulate(broken, 8)
    assert ordering_faults(trace, {"layer": 0}) == []  # exact all the same: no equivalence test could tell
    assert overlap_faults(trace, broken, 8)[0] == "stage 0: its blocks forward batch 2 only after dL/dh of 1 is back"
    assert sum(trace.idle) > sum(simulate(schedules, 8).idle)


def test_a_heads_first_stage_that_awaits_h_before_handing_on_is_caught():
    schedules = pipeline_schedules(Placement.parse(["1.5h", 2.5]))
    apply = next(a for a in schedules[0] if a.op == "apply")
    broken = _moved(schedules, 0, apply, Action("send", peers=(1,)))
    assert overlap_faults(simulate(broken, 8), broken, 8)[0] == "stage 0: awaits h of 1 before batch 2 went on"


def test_a_schedule_that_waits_in_a_cycle_is_a_deadlock_named_by_stage():
    schedules = pipeline_schedules(Placement.parse(["1.5h", 2.5]))
    # the heads' stage awaits h of batch t before it sends t on: the layer's stage can never make it
    apply = next(a for a in schedules[0] if a.op == "apply")
    early = Action("apply", "heads_first", lag=0, peers=apply.peers, what="h")
    broken = [[early if a == apply else a for a in schedules[0]], schedules[1]]
    broken = _moved(broken, 0, early, Action("send", peers=(1,)))
    with pytest.raises(Deadlock, match=r"stage 0 at apply h\(0\) <- 1; stage 1 at recv x\(0\) <- 0"):
        simulate(broken, 4)
