"""Every stage's schedule run against the others, with no process and no tensor: deadlock, order, buffers, overlap.

Each stage takes its actions (pipeline/engine/schedule.py) for batches 0..N-1 in order, with a test pass every few
batches (its first batch: every update settled, a heads-first block's heads weights to its layer's stage; a
checkpoint or ALIGN marker settles alike), then the end of the run as Stage does it: END from the stage before,
its updates settled, END to its remote-gradient peers and on. Every action takes simulated time (a forward, a
learn or an applied update one slot per role; a message one slot to travel), and waits for what it needs: a
receive for the message, a send for room in the bounded queue to the next stage, an apply for the gradients of
the batches up to t - lag. If no stage can go on before all are done, the placement deadlocks (`Deadlock` names
what each stuck stage waits for). The Trace keeps every action's times, the most messages each link held and
the most batches each role had awaiting a gradient, and each stage's idle slots; from it:
- ordering_faults: updates of batch t that did not land before the forward of t + 1 + D that needs it (D: the
  role's delay; the heads' halves have no forward of their own to order);
- overlap_faults: exact schedules that do not overlap what they claim: a split layer's stage forwards its whole
  blocks for t+1 before it applies dL/dh of t; a heads-first stage hands t+1 on before it awaits h of t; DFA with
  a delay forwards t+1 before it applies the error of t (an order within each stage: the idle slots show what
  the order buys);
- link_faults: what one stage's links cannot carry.
Not modelled: a link's receive being posted only once a batch awaits it (StageIO.want_error), and an apply's
taking gradients early, before they are due (it only ever takes them sooner than the model does).
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field

from pipeline.engine.schedule import Action

COST = {"forward": 1, "learn": 1, "train": 2}  # slots per role action; an applied update costs 1 too
LATENCY = 1  # slots a message travels


class Deadlock(RuntimeError):
    """No stage can take its next action, and some have not finished."""


@dataclass
class Event:
    """One action taken: on which stage, for which batch, and when (start, end in slots)."""

    stage: int
    action: Action
    batch: int | None  # None: the end of the run
    start: float
    end: float
    updates: list[int] = field(default_factory=list)  # an apply: the batches whose updates it applied


@dataclass
class Trace:
    """What a simulated run did, and what its buffers held at most."""

    events: list[Event]
    sent: dict  # (sender, receiver, what, batch) -> time it was sent
    consumed: dict  # (sender, receiver, what, batch) -> time the receiver took it
    link_peak: dict  # (sender, receiver, what) -> most messages sent and not yet taken
    awaiting_peak: dict  # (stage, role) -> most batches forwarded and not yet updated
    idle: list[float]  # each stage's slots spent waiting
    makespan: float

    def find(self, stage: int, op: str, role: str = "", batch: int | None = None) -> list[Event]:
        return [e for e in self.events if e.stage == stage and e.action.op == op and (not role or e.action.role == role)
                and (batch is None or e.batch == batch)]


def _settle(schedule: list[Action], upto: int) -> list[tuple[Action, int | None]]:
    """Every update outstanding through batch `upto`, and what a role sends after its update (Role.settle)."""
    actions: list[tuple[Action, int | None]] = []
    for k, action in enumerate(schedule):
        if action.op == "apply":
            actions.append((Action("settle", action.role, lag=0, peers=action.peers, what=action.what), upto))
            actions += [(a, upto + a.lag) for a in schedule[k + 1:]  # the heads' dL/dh of what they learned
                        if a.op == "send_back" and a.role == action.role and a.lag == action.lag]
    return actions


def _marker(rank: int, schedule: list[Action], upto: int) -> list[tuple[Action, int | None]]:
    """A test pass's first batch after batch `upto` (Stage._eval; a checkpoint and ALIGN settle alike): from the
    stage before, every update in, a heads-first stage's heads weights to the layer's stage, which takes them,
    and on."""
    roles = {a.role for a in schedule}
    actions: list[tuple[Action, int | None]] = [(Action("recv", peers=(rank - 1,), what="EVAL"), upto)] if rank else []
    actions += _settle(schedule, upto)
    if "heads_first" in roles:
        actions.append((Action("send_back", peers=(rank + 1,), what="W"), upto))
    if "layer_after" in roles:
        actions.append((Action("recv", peers=(rank - 1,), what="W"), upto))
    return actions + [(Action("send", peers=a.peers, what="EVAL"), upto) for a in schedule if a.op == "send"]


def _program(rank: int, schedule: list[Action], batches: int, every: int) -> list[tuple[Action, int | None]]:
    """The stage's actions for every batch, a test pass every `every` batches, then the end of the run
    (pipeline/engine/stage.py: Stage._end, run)."""
    steps: list[tuple[Action, int | None]] = []
    for t in range(batches):
        steps += [(action, t) for action in schedule]
        if (t + 1) % every == 0:
            steps += _marker(rank, schedule, t)
    end: list[tuple[Action, int | None]] = []
    if rank > 0:
        end.append((Action("recv", peers=(rank - 1,), what="END"), None))
    end += _settle(schedule, batches - 1)
    back = sorted({p for a in schedule if a.op == "send_back" for p in a.peers})
    end += [(Action("send_back", peers=(p,), what="END"), None) for p in back]
    end += [(Action("send", peers=a.peers, what="END"), None) for a in schedule if a.op == "send"]
    ins = sorted({p for a in schedule if a.op == "apply" for p in a.peers})
    end += [(Action("recv", peers=(p,), what="END"), None) for p in ins]
    return steps + end


def simulate(schedules: list[list[Action]], batches: int = 8, capacity: int = 2, every: int = 5) -> Trace:
    """Run every stage's program (`capacity` batches in the queue between two stages, a test pass every `every`
    batches); raise Deadlock, naming what each stuck stage waits for, if they stop short."""
    world = len(schedules)
    programs = [_program(k, s, batches, every) for k, s in enumerate(schedules)]
    pc, clock, idle = [0] * world, [0.0] * world, [0.0] * world
    sent: dict = {}
    consumed: dict = {}
    queues: dict = defaultdict(deque)  # (sender, receiver, what) -> batches sent, not yet taken
    link_peak: dict = defaultdict(int)
    awaiting: dict = defaultdict(deque)  # (stage, role) -> batches forwarded, not yet updated
    awaiting_peak: dict = defaultdict(int)
    pending: dict = defaultdict(list)  # (stage, role) -> batches learned from, their send_back not yet taken
    events: list[Event] = []

    def what_of(action: Action) -> str:  # the name a message travels under (what the receiver waits for)
        return "x" if action.what in ("x", "x,h") else action.what

    def take(rank: int, action: Action, t: int | None) -> Event | None:
        """Take the action if what it needs is there: its Event, else None."""
        now = clock[rank]
        op = action.op
        if op == "recv":
            source = action.peers[0]
            if source == -1:  # the data source: always ready
                return Event(rank, action, t, now, now)
            key = (source, rank, what_of(action))
            if not queues[key] or queues[key][0] != t:
                return None
            queues[key].popleft()
            start = max(now, sent[key + (t,)] + LATENCY)
            consumed[key + (t,)] = start
            return Event(rank, action, t, start, start)
        if op in ("send", "send_back"):
            learned = op == "send_back" and action.role in ("heads", "heads_first")  # dL/dh of what the heads learned
            batches_out = pending[(rank, action.role)] if learned else [t]
            start = now
            for peer in action.peers:
                key = (rank, peer, what_of(action))
                if what_of(action) == "x" and t >= capacity:
                    taken = consumed.get(key + (t - capacity,))
                    if taken is None:
                        return None  # the queue to the next stage is full
                    start = max(start, taken)
            for peer in action.peers:
                key = (rank, peer, what_of(action))
                for b in batches_out:
                    queues[key].append(b)
                    sent[key + (b,)] = start
                    link_peak[key] = max(link_peak[key], len(queues[key]))
            if learned:
                pending[(rank, action.role)] = []
            return Event(rank, action, t, start, start)
        if op in ("apply", "settle"):  # settle: every update outstanding at the end (Role.settle)
            source = action.peers[0]
            key = (source, rank, action.what)
            mine = awaiting[(rank, action.role)]
            expects = action.role == "heads_first" and op == "apply"  # batch t went on: its h will come back
            target = None if action.lag is None else t - action.lag
            due = [b for b in [*mine, *([t] if expects else [])] if target is not None and b <= target]
            if any(b not in queues[key] for b in due):
                return None  # (nothing changed: the action is tried again later)
            if expects:
                mine.append(t)
                awaiting_peak[(rank, action.role)] = max(awaiting_peak[(rank, action.role)], len(mine))
            start, applied = now, []
            for b in due:
                if queues[key][0] != b:
                    raise RuntimeError(f"stage {rank} awaits {action.what}({b}) but {action.what}({queues[key][0]}) comes first")
                queues[key].popleft()
                start = max(start, sent[key + (b,)] + LATENCY)
                consumed[key + (b,)] = start
                mine.popleft()
                applied.append(b)
                if action.role == "heads_first":
                    pending[(rank, action.role)].append(b)
            return Event(rank, action, t, start, start + len(applied), applied)
        # forward, learn, train: this stage's own compute
        if op == "forward" and action.role in ("layer", "layer_after", "dfa"):
            mine = awaiting[(rank, action.role)]
            mine.append(t)
            awaiting_peak[(rank, action.role)] = max(awaiting_peak[(rank, action.role)], len(mine))
        if action.role == "heads" and op == "learn":
            pending[(rank, action.role)].append(t)
        return Event(rank, action, t, now, now + COST[op])

    while True:
        moved = False
        for rank in range(world):
            while pc[rank] < len(programs[rank]):
                action, t = programs[rank][pc[rank]]
                event = take(rank, action, t)
                if event is None:
                    break
                idle[rank] += event.start - clock[rank]
                clock[rank] = event.end
                events.append(event)
                pc[rank] += 1
                moved = True
        if all(pc[k] == len(programs[k]) for k in range(world)):
            break
        if not moved:
            stuck = [f"stage {k} at {programs[k][pc[k]][0].text(programs[k][pc[k]][1] if programs[k][pc[k]][1] is not None else 'end')}"
                     for k in range(world) if pc[k] < len(programs[k])]
            raise Deadlock("deadlock: " + "; ".join(stuck))
    makespan = max(clock)
    return Trace(events, sent, consumed, dict(link_peak), dict(awaiting_peak), idle, makespan)


def ordering_faults(trace: Trace, delays: dict[str, int]) -> list[str]:
    """Updates that did not land before the forward that needs them: update(t) before forward(t + 1 + D)."""
    faults = []
    world = 1 + max(e.stage for e in trace.events)
    for rank in range(world):
        updated: dict[tuple[str, int], float] = {}
        for e in trace.events:
            if e.stage != rank or e.batch is None:
                continue
            role = e.action.role
            if e.action.op in ("learn", "train"):
                updated[(role, e.batch)] = e.end
            for b in e.updates:
                updated[(role, b)] = e.end
        for e in trace.find(rank, "forward") + trace.find(rank, "train"):
            role, t = e.action.role, e.batch
            before = t - 1 - delays.get(role, 0)
            if before >= 0 and updated.get((role, before), float("inf")) > e.start:
                faults.append(f"stage {rank}: {role} forwards batch {t} before the update of batch {before} is in")
    return faults


def overlap_faults(trace: Trace, schedules: list[list[Action]], batches: int) -> list[str]:
    """The overlaps the exact schedules claim, where they do not happen (steady state: batches 1..N-3)."""
    faults = []

    def applied(rank: int, role: str, t: int) -> float:  # when the apply that took batch t's gradient began
        event = next(e for e in trace.events if e.stage == rank and e.action.role == role and t in e.updates)
        return event.start if event.action.op == "apply" else float("inf")  # a test pass's settle: not a step's

    for rank, schedule in enumerate(schedules):
        ops = {(a.op, a.role) for a in schedule}
        steady = range(1, batches - 2)
        if ("forward", "blocks") in ops and ("apply", "layer") in ops:
            for t in steady:  # the blocks forward t+1 while dL/dh of t travels: its apply comes after
                if applied(rank, "layer", t) <= trace.find(rank, "forward", "blocks", t + 1)[0].start:
                    faults.append(f"stage {rank}: its blocks forward batch {t + 1} only after dL/dh of {t} is back")
        if ("apply", "heads_first") in ops:
            for t in steady:  # h of t awaited only after t+1 went on
                if applied(rank, "heads_first", t) < trace.find(rank, "send", "", t + 1)[0].start:
                    faults.append(f"stage {rank}: awaits h of {t} before batch {t + 1} went on")
        lag = next((a.lag for a in schedule if a.op == "apply" and a.role == "dfa"), 0)
        if lag != 0:
            for t in steady:  # with a delay, forward t+1 before the error of t is applied
                if applied(rank, "dfa", t) <= trace.find(rank, "forward", "dfa", t + 1)[0].start:
                    faults.append(f"stage {rank}: forwards batch {t + 1} only after the error of {t} is back")
    return faults


def link_faults(schedules: list[list[Action]]) -> list[str]:
    """What the links cannot carry: a stage has one remote-gradient link in, and sends every remote-gradient
    message to every stage it sends such messages to (pipeline/transport/base.py: Links)."""
    faults = []
    for rank, schedule in enumerate(schedules):
        sources = {a.peers for a in schedule if a.op == "apply"}
        targets = {a.peers for a in schedule if a.op == "send_back"}
        if len(sources) > 1:
            faults.append(f"stage {rank} would await remote gradients from stages {sorted(p for s in sources for p in s)} "
                          "on its one link in")
        if len(targets) > 1:
            faults.append(f"stage {rank} would send different remote gradients to stages "
                          f"{sorted(p for s in targets for p in s)} over one link out")
    return faults
