"""Heads first: a block's local heads on one stage, its layer on the next; h comes back, dL/dh goes on.

    stage k:      its blocks(t+1) ──► [out, y] on ...... heads(h of t): loss, step ──► dL/dh(t) on
    stage k+1:    layer(t) ──► h(t) back ──► its other blocks(t) ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─► h.backward(dL/dh), step

The mirror image of pipeline/engine/remote_heads.py, for a stage k whose own blocks cost less than the next stage's:
it takes on the heads of the first block of stage k+1 (1.5h,2.5: stage 0 runs block 0 and block 1's heads,
stage 1 block 1's layer and blocks 2 and 3). Both stages build the whole block from the same seed and each
steps its own half, as for split heads.

[Note: the heads-first schedule]
Stage k+1 forwards the layer for batch t, sends h(t) back, trains its other blocks on t while h and dL/dh
travel, and applies dL/dh(t) before the layer forwards t+1 (SplitLayer with its heads upstream). Stage k
trains its own blocks on batch t+1 first, then waits for h(t) and learns from it: h(t) was sent while stage k
worked, and stage k+1 waits for dL/dh(t) only for what its other blocks do not cover (their step against the
rest of stage k's step and the round trip). Every number is the sequential trainer's (each half's update is the
same function of the same h, y and weights), unless --heads-max-delay D > 0 lets the layer forward up to D
batches ahead of its dL/dh (as for split heads). Stage k lags one batch behind for the heads; it waits for h
only after handing its next batch on, so neither stage waits on the other in a cycle.

Test batches: the block's classifier is scored on stage k+1, where h is. Before a test, after the updates of
the batches before it are in, stage k sends the heads' weights to stage k+1, which scores with them.
"""

from __future__ import annotations

from pipeline.block.blocks import LocalBlock
from pipeline.persistence.checkpoint import flatten_state, unflatten_state
from pipeline.transport.message import Kind, Message
from pipeline.block.nonfinite import NonFiniteWatch
from pipeline.engine.remote_gradient import RemoteGradients, send_gradient
from pipeline.engine.remote_heads import RemoteHeads, SplitLayer
from pipeline.engine.roles import Role, Step
from pipeline.engine.schedule import Action
from pipeline.engine.stage_io import StageIO


class HeadsFirst(Role):
    """The heads of the first block of the next stage, on this stage: h of batch t arrives while this stage
    trains its own blocks on t+1, then the heads learn from it and send dL/dh on."""

    name = "heads_first"
    receives = True  # h

    def __init__(self, rank: int, block: LocalBlock, io: StageIO, watch: NonFiniteWatch):
        super().__init__([block])
        self.block, self.io = block, io
        self.heads = RemoteHeads(block, io)
        self.incoming = RemoteGradients(rank, io, watch, self._learn,
                                        what=lambda index: f"h of block {block.index}, batch {index}, from stage {rank + 1}")
        self.shared_at = -1  # how many batches the heads had learned from when their weights were last sent

    @property
    def tested(self) -> list:
        return []  # scored on the layer's stage, where h is

    def apply(self, step: Step, action: Action) -> None:
        """Batch t went on to the layer's stage, so its h will come back; learn from h of the batches up to
        t - lag, waiting for it, and of no later one (a step learns from the same batches whatever the timing:
        an injected fault or a non-finite loss is named by the same batch)."""
        self.incoming.expect(step.msg.epoch, step.msg.index, None, lambda: None, step.seq)
        self.incoming.apply_through(None if action.lag is None else step.seq - action.lag, early=False)

    def _learn(self, _graph, item: Message) -> None:
        h, y = item.tensors
        self.heads.learn(Step(item, h, y, h_in=h))

    def send_back(self, step: Step, action: Action) -> None:
        self.heads.send_back()

    def settle(self) -> None:
        self.incoming.settle()
        self.heads.send_back()

    def await_stream_end(self) -> None:
        self.incoming.await_stream_end()

    def evaluate(self, step: Step) -> None:
        """Before a test: the heads' weights to the layer's stage, which scores the block's classifier. One frame
        and a manifest, as for ALIGN (a user's heads may hold more tensors than a message carries frames)."""
        if self.incoming.updates == self.shared_at:
            return  # unchanged since they were last sent
        self.shared_at = self.incoming.updates
        flat, manifest = flatten_state([self.block])  # a copy: the heads may step before the send thread reads it
        self.io.put_error(Message(Kind.FEEDBACK, tensors=[flat], meta={"heads_weights": manifest}))


class LayerAfterHeads(SplitLayer):
    """The layer half of a heads-first block, on the stage after its heads': h goes back, dL/dh comes on."""

    name = "layer_after"

    def __init__(self, rank: int, block: LocalBlock, io: StageIO, watch: NonFiniteWatch, max_delay: int):
        super().__init__(rank, block, io, watch, max_delay)
        self.io = io
        self.received_at = -1  # how many updates were in when the heads' weights last came
        self._h = None  # the batch's detached h, between its forward and its send back

    @property
    def tested(self) -> list:
        return [self.block]  # h is here: the heads' weights come for each test

    def forward(self, step: Step, action: Action) -> None:
        """As SplitLayer.forward; step.x goes on through this stage's blocks (h stays here)."""
        super().forward(step, action)
        self._h, step.h_out = step.h_out, None

    def send_back(self, step: Step, action: Action) -> None:
        """h to the heads' stage with the batch's labels (a copy: their receive buffer is not held for the send)."""
        send_gradient(self.io, step.msg, [self._h, step.y.clone()])
        self._h = None

    def evaluate(self, step: Step) -> None:
        """It scores the block's classifier, with the heads' weights as of this test."""
        self._take_heads_weights()
        super().evaluate(step)
        step.hits.append(self.block.hits(step.h_out, step.y))
        step.h_out = None

    def _take_heads_weights(self) -> None:
        """Load the heads' weights their stage sent after the last dL/dh (whenever the updates changed since they
        last came)."""
        updates = self.gradients.updates
        if updates == self.received_at:
            return
        self.received_at = updates
        block = self.block
        what = f"the weights of block {block.index}'s heads from stage {block.partner}"
        self.io.want_error()
        item = self.io.next_error(what, block=True)
        manifest = item.meta.get("heads_weights") if item.kind == Kind.FEEDBACK else None
        if manifest is None:
            raise RuntimeError(f"awaited {what}, got {item.kind.name} for batch {item.index}")
        state = unflatten_state(item.tensors[0], manifest)[block.index]
        unexpected = block.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"{what} name entries this block lacks: {unexpected}")
        item.release()
