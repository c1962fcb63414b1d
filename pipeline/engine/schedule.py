"""The schedule as data: what each stage does, in order, for one training batch t, from the placement and the loss.

A stage's blocks take one of these roles (in block order; a stage has each at most once):

    heads            the heads of the previous stage's last block (split heads: its layer runs upstream)
    layer_after      the layer of a block whose heads ran first, on the previous stage (heads first)
    blocks           whole blocks, layer and heads here
    layer            the layer of this stage's last block, its heads on the next stage (split heads)
    heads_first      the heads of the next stage's first block, whose layer runs there (heads first)
    dfa, dfa_output  DFA: hidden blocks before the last stage; the last stage's hidden blocks and output

and `stage_schedule` lists their actions for batch t. `Stage` (pipeline/engine/stage.py) runs the list as it is, and
pipeline/engine/simulate.py runs every stage's list against the others with no process and no tensor, to check that
no placement deadlocks, that every update lands before the forward that needs it, that buffers stay bounded,
and that each exact schedule overlaps what it claims to. `python -m pipeline schedule` prints them.

Actions (`lag` says which batch: t - lag):
    recv       the batch from the stage before (stage 0: from the data source)
    forward    the role's forward pass on t, its graph kept for `learn` or for a remote gradient
    train      forward and learn, one block at a time (the lean order: one block's graph held at a time)
    learn      the role's update from its own loss on t
    apply      apply the remote gradients ("dL/dh", "h", "e") that have arrived, and wait for that of t - lag
               (lag None: wait for none)
    send       the batch's output (and a split layer's h) on to the next stage
    send_back  the role's message for t - lag to `peers`: dL/dh, h, or DFA's output error e
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.engine.partition import Placement

ROLES = ("heads", "layer_after", "blocks", "layer", "heads_first", "dfa", "dfa_output")
# roles whose forward keeps the batch's receive buffers until a remote gradient arrives (its graph reads them)
HOLDS_INPUT = ("layer_after", "layer", "dfa")


@dataclass(frozen=True)
class Action:
    """One thing a stage does for training batch t."""

    op: str  # recv, forward, train, learn, apply, send, send_back
    role: str = ""  # which role acts ("" for the stage's own receive and send)
    lag: int | None = 0  # the batch it concerns: t - lag
    peers: tuple[int, ...] = ()  # recv, apply: the stage it comes from; send, send_back: where it goes
    what: str = "x"  # the message: x (the batch), dL/dh, h, e

    def text(self, t: int | str = "t") -> str:
        """The action for batch t, as the printer shows it: "apply dL/dh(t-1) <- 1"."""
        batch = _batch(t, self.lag)
        if self.op == "settle":  # the end of the run (pipeline/engine/simulate.py)
            return f"settle {self.what}(..{batch}) <- {','.join(map(str, self.peers))}"
        if self.op in ("recv", "apply"):
            source = "data" if self.peers == (-1,) else ",".join(map(str, self.peers))
            if self.op == "recv":
                return f"recv {self.what}({batch}) <- {source}"
            return f"apply {self.what}(arrived)" if self.lag is None else f"apply {self.what}({batch}) <- {source}"
        if self.op in ("send", "send_back"):
            return f"send {self.what}({batch}) -> {','.join(map(str, self.peers))}"
        return f"{self.op} {self.role}({batch})"


def _batch(t: int | str, lag: int | None) -> str:
    if isinstance(t, int):
        return str(t - (lag or 0))
    return t if not lag else f"{t}-{lag}"


def stage_roles(placement: Placement, rank: int, dfa: bool = False) -> list[str]:
    """The roles of stage `rank`'s blocks, in block order."""
    world = len(placement.sizes)
    if dfa:
        return ["dfa_output"] if rank == world - 1 else ["dfa"]
    blocks = placement.ranges[rank]
    first, last = blocks[0], blocks[-1]
    roles = []
    if placement.partner(rank, first) == rank - 1:
        roles.append("layer_after" if placement.part(rank, first) == "layer" else "heads")
    whole = [i for i in blocks if placement.partner(rank, i) is None]
    if whole:
        roles.append("blocks")
    if placement.partner(rank, last) == rank + 1:
        roles.append("layer" if placement.part(rank, last) == "layer" else "heads_first")
    return roles


def stage_schedule(placement: Placement, rank: int, *, dfa: bool = False, lean: bool = False, heads_delay: int = 0,
                   dfa_delay: int | None = 0) -> list[Action]:
    """Stage `rank`'s actions for one training batch t, in the order it takes them.

    [Note: the exact overlapped schedule] (pipeline/engine/remote_heads.py): a split layer's stage forwards the whole
    blocks before it for t while dL/dh of t-1 travels, then applies it, forwards the layer, sends t on, and lets
    those blocks learn. [Note: the heads-first schedule] (pipeline/engine/upstream_heads.py): the heads' stage hands
    batch t on first, then applies h of t-1; the layer's stage applies dL/dh of t-1 before its forward of t.
    A delay D (--heads-max-delay, --dfa-max-delay) lets a layer forward D batches past its oldest update.
    """
    world = len(placement.sizes)
    up, down = rank - 1, rank + 1
    has_next = rank < world - 1
    actions = [Action("recv", peers=(up if rank else -1,), what="x")]
    if dfa:
        if has_next:  # forward with the graphs kept, on at once, the errors applied as they come
            return actions + [Action("forward", "dfa"), Action("send", peers=(down,)),
                              Action("apply", "dfa", lag=dfa_delay, peers=(world - 1,), what="e")]
        return actions + [Action("forward", "dfa_output"),
                          *([Action("send_back", "dfa_output", peers=tuple(range(world - 1)), what="e")] if world > 1 else []),
                          Action("learn", "dfa_output")]
    roles = stage_roles(placement, rank)
    if "heads" in roles:  # first: the previous stage awaits this dL/dh
        actions += [Action("learn", "heads"), Action("send_back", "heads", peers=(up,), what="dL/dh")]
    if "layer_after" in roles:  # its heads, on the previous stage, await h
        actions += [Action("apply", "layer_after", lag=1 + heads_delay, peers=(up,), what="dL/dh"),
                    Action("forward", "layer_after"), Action("send_back", "layer_after", peers=(up,), what="h")]
    overlap = has_next and not lean  # the next stage starts once the forwards are done; the blocks learn after
    if "blocks" in roles:
        actions.append(Action("forward", "blocks") if overlap else Action("train", "blocks"))
    if "layer" in roles:
        actions += [Action("apply", "layer", lag=1 + heads_delay, peers=(down,), what="dL/dh"), Action("forward", "layer")]
    if has_next:
        actions.append(Action("send", peers=(down,), what="x,h" if "layer" in roles else "x"))
    if "blocks" in roles and overlap:
        actions.append(Action("learn", "blocks"))
    if "heads_first" in roles:  # the batch went on: learn from the h of the one before
        actions += [Action("apply", "heads_first", lag=1, peers=(down,), what="h"),
                    Action("send_back", "heads_first", lag=1, peers=(down,), what="dL/dh")]
    return actions


def buffer_users(actions: list[Action]) -> int:
    """How many parts of a step hold the received batch's buffers: the step itself, each send of it, and each
    forward whose graph waits for a remote gradient (the receive buffers go back when all are done)."""
    return 1 + sum(a.op == "send" for a in actions) + sum(a.op == "forward" and a.role in HOLDS_INPUT for a in actions)


def pipeline_schedules(placement: Placement, **options) -> list[list[Action]]:
    """Every stage's schedule."""
    return [stage_schedule(placement, rank, **options) for rank in range(len(placement.sizes))]
