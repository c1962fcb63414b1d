"""`python -m pipeline schedule`: every stage's actions side by side, and a simulated timeline of a few batches."""

from __future__ import annotations

from pipeline.engine.partition import Placement
from pipeline.engine.schedule import Action, pipeline_schedules
from pipeline.engine.simulate import LATENCY, simulate


def _columns(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(r[k]) for r in rows + [header]) for k in range(len(header))]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(header), "-+-".join("-" * w for w in widths), *map(line, rows)]


def per_batch(schedules: list[list[Action]]) -> list[str]:
    """Each stage's actions for batch t, one column per stage."""
    depth = max(len(s) for s in schedules)
    rows = [[s[i].text() if i < len(s) else "" for s in schedules] for i in range(depth)]
    return _columns(rows, [f"stage {k}" for k in range(len(schedules))])


def timeline(schedules: list[list[Action]], batches: int) -> list[str]:
    """What each stage starts in each slot of a simulated run ('.': waiting; blank: busy with the last action)."""
    trace = simulate(schedules, batches)
    world = len(schedules)
    slots = int(trace.makespan) + 1
    cells = [[[] for _ in range(world)] for _ in range(slots)]
    busy = [[False] * world for _ in range(slots)]
    for e in trace.events:
        if e.batch is not None and e.batch - (e.action.lag or 0) < 0:
            continue  # an apply or a send of a batch before the first: nothing to do
        t = "end" if e.batch is None else e.batch
        cells[int(e.start)][e.stage].append(e.action.text(t))
        for slot in range(int(e.start), int(e.end)):
            busy[slot][e.stage] = True
    rows = [[str(slot)] + ["; ".join(c) if c else ("" if busy[slot][k] else ".") for k, c in enumerate(cells[slot])]
            for slot in range(slots)]
    lines = _columns(rows, ["slot"] + [f"stage {k}" for k in range(world)])
    idle = ", ".join(f"stage {k} {trace.idle[k]:g}" for k in range(world))
    return lines + [f"idle slots: {idle} (of {trace.makespan:g})"]


def describe(placement: Placement, batches: int = 3, **options) -> str:
    """The printer's output for a placement and the schedule's options (stage_schedule's keywords)."""
    schedules = pipeline_schedules(placement, **options)
    flags = {"dfa": "--loss dfa", "lean": "--stage-order lean", "heads_delay": "--heads-max-delay", "dfa_delay": "--dfa-max-delay"}
    shown = " ".join(flags[k] + ("" if v is True else f" {v}") for k, v in options.items()
                     if v not in (False, 0) and (k != "dfa_delay" or options.get("dfa")))
    head = f"partition {placement.text}" + (f" ({shown})" if shown else "")
    return "\n".join([f"{head}: every stage's actions for training batch t", *per_batch(schedules), "",
                      f"simulated, {batches} batches (a forward, a learn or an applied update takes 1 slot, a message "
                      f"{LATENCY} slot to arrive):", *timeline(schedules, batches)])
