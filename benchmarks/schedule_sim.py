"""A simulator of pipeline schedules on measured costs: GPipe, 1F1B and local learning, one batch (or steady state).

Each stage runs its operations in its schedule's order, one at a time; an operation starts when its stage is free
and what it needs has arrived: F(k, m) needs F(k-1, m) plus the send of its activation, B(k, m) needs F(k, m) and
B(k+1, m) plus the send of the gradient. The time of a training step is the last operation's end: the bubble is
whatever the order leaves idle. GPipe: every forward, then every backward. 1F1B (torch.distributed.pipelining's
Schedule1F1B): stage k runs min(M, K-1-k) forwards first, then one forward and one backward in turn, then the
remaining backwards.
"""

from __future__ import annotations

from typing import Sequence


def gpipe_order(stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    return [("F", m) for m in range(microbatches)] + [("B", m) for m in range(microbatches)]


def one_f_one_b_order(stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    warmup = min(microbatches, stages - 1 - stage)
    order = [("F", m) for m in range(warmup)]
    for m in range(microbatches - warmup):
        order += [("F", warmup + m), ("B", m)]
    return order + [("B", m) for m in range(microbatches - warmup, microbatches)]


ORDERS = {"gpipe": gpipe_order, "1f1b": one_f_one_b_order}


def step_time(schedule: str, forward: Sequence[float], backward: Sequence[float], send: Sequence[float],
              microbatches: int) -> float:
    """Seconds of one training step: `forward[k]`, `backward[k]` are stage k's times per micro-batch (the optimizer
    step is in the last backward's), `send[k]` the time of one micro-batch's activation from stage k to k+1 (its
    gradient back costs the same)."""
    stages = len(forward)
    orders = [ORDERS[schedule](k, stages, microbatches) for k in range(stages)]
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * stages
    position = [0] * stages
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for k in range(stages):
            if position[k] == len(orders[k]):
                continue
            kind, m = orders[k][position[k]]
            if kind == "F":
                arrival = 0.0 if k == 0 else _after(done, ("F", k - 1, m), send[k - 1])
            else:
                arrival = _after(done, ("F", k, m), 0.0)
                if k < stages - 1 and arrival is not None:
                    gradient = _after(done, ("B", k + 1, m), send[k])
                    arrival = None if gradient is None else max(arrival, gradient)
            if arrival is None:
                continue
            ready = max(free[k], arrival)
            end = ready + (forward[k] if kind == "F" else backward[k])
            done[(kind, k, m)] = free[k] = end
            position[k] += 1
            remaining -= 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"the {schedule} order deadlocks")
    return max(free)


def _after(done: dict, op: tuple[str, int, int], delay: float) -> float | None:
    return None if op not in done else done[op] + delay


def gpipe_closed_form(forward: Sequence[float], backward: Sequence[float], microbatches: int) -> float:
    """GPipe's step without sends: every stage's forward and backward once, plus M-1 of the slowest stage's."""
    per_stage = [f + b for f, b in zip(forward, backward)]
    return sum(per_stage) + (microbatches - 1) * max(per_stage)


def local_step_time(stage_times: Sequence[float], chains: Sequence[float] = ()) -> float:
    """Local learning in steady state: a batch per slowest stage (nothing waits for a backward from downstream),
    or per a split block's serial chain where that is longer."""
    return max(list(stage_times) + list(chains))
