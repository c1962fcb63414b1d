"""Memory accounting: what autograd saves is counted by storage, exactly what the graphs hold, and let go with them."""

import torch
from helpers import small_config
from pipeline.block.blocks import head_loss
from pipeline.model.factories import build_blocks
from pipeline.observe.memory import LiveBytes, MemoryMeter


def graph_saved_bytes(*roots: torch.Tensor, parameters: set = frozenset()) -> int:
    """An independent count: walk the graphs from `roots`, read every node's saved tensors (`_saved_*`), and add
    up their storages once each, the block's parameters and buffers left out (as the meter does), and so are the 0-dim wrapped numbers that
    autograd keeps for a Python scalar (`loss * 0.99`), which never reach a pack hook."""
    seen_nodes, storages, stack = set(), {}, [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            values = getattr(node, name)
            for value in values if isinstance(values, (tuple, list)) else [values]:
                if not isinstance(value, torch.Tensor):
                    continue
                if not (value.dim() == 0 and value.dtype in (torch.float64, torch.int64)):  # a wrapped number
                    key = LiveBytes.key(value)
                    if key is not None and key not in parameters:
                        storages[key] = key[3]
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


def _step_until_backward(cfg, shape):
    blocks = build_blocks(cfg, shape, 10)
    meter = MemoryMeter().attach(blocks)
    block = blocks[0]
    x, y = torch.randn(32, *shape), torch.arange(32) % 10
    with meter.saving():
        h, out = block.forward_train(x)
        with meter.part("heads"):
            loss, _ = head_loss(block.heads, h, y)
    return meter, block, h, out, loss


def _parameters_of(block):
    return {LiveBytes.key(t) for t in [*block.parameters(), *block.buffers()]}


def test_saved_bytes_are_what_the_graphs_hold_by_storage():
    for cfg, shape in ((small_config(), (1, 28, 28)), (small_config(model="vgg8b", like="cifar10", model__feat_mult=0.0625), (3, 32, 32))):
        meter, block, h, out, loss = _step_until_backward(cfg, shape)
        expected = graph_saved_bytes(loss, h, out, parameters=_parameters_of(block))
        assert meter.saved_now() == expected > 0
        assert meter.saved.peak_by_tag["heads"] > 0 and meter.saved.peak_by_tag["layer"] > 0
        del out  # a stage detaches the output at once: its dropout's graph goes
        loss.backward()
        assert meter.saved_now() == 0  # backward let go of every saved tensor


def test_a_storage_saved_through_several_views_counts_once():
    meter = MemoryMeter()
    weight = torch.randn(64, 64, requires_grad=True)
    meter.model_storages.add(LiveBytes.key(weight))  # a parameter: held anyway, not counted as saved
    with meter.saving():
        x = torch.randn(16, 64) * 2  # one storage of 4 KiB
        a, b = x[:8], x[8:]  # two views of it, each saved by its matmul
        loss = (a @ weight).sum() + (b @ weight).sum()
    assert meter.saved_now() == x.nbytes
    loss.backward()
    assert meter.saved_now() == 0 and meter.saved.peak == x.nbytes


def test_the_meter_keeps_autogards_in_place_check():
    meter = MemoryMeter()
    a = torch.randn(8, requires_grad=True)
    with meter.saving():
        b = a * 2
        c = b.sin()  # saves b
    b.add_(1)
    try:
        c.sum().backward()
    except RuntimeError as exc:
        assert "modified by an inplace operation" in str(exc)
    else:
        raise AssertionError("an in-place change of a saved tensor went unnoticed")


def test_gradients_and_messages_are_counted_while_alive():
    blocks = build_blocks(small_config(), (1, 28, 28), 10)
    meter = MemoryMeter().attach(blocks)
    x, y = torch.randn(32, 1, 28, 28), torch.arange(32) % 10
    h, _ = blocks[0].forward_train(x)
    blocks[0].learn(h, y)
    grads = sum(p.nbytes for p in blocks[0].parameters() if p.requires_grad)
    assert meter.gradient_peak == grads  # one block's gradients at a time
    released = []
    release = meter.hold_message([x, y, x[:4]], lambda: released.append(True))
    assert meter.messages.total == x.nbytes + y.nbytes
    release()
    assert released and meter.messages.total == 0 and meter.messages.peak == x.nbytes + y.nbytes


def test_hooks_of_a_delayed_update_inside_the_meter_are_still_counted():
    """Delayed updates (async DFA, --heads-max-delay) keep the forward-time weights with saved-tensor hooks of their
    own; PyTorch runs only the innermost hooks, so they report to the meter themselves."""
    from pipeline.model.feedback import keep_weights_at_forward

    layer = torch.nn.Linear(50, 50)
    meter = MemoryMeter()
    x = torch.randn(200, 50, requires_grad=True)  # (so that the weight is saved too, for x's gradient)
    with meter.saving(), keep_weights_at_forward(list(layer.parameters())):
        out = torch.tanh(layer(x))
    # x (40000 bytes), tanh's output (40000) and the kept copy of the weight (10000)
    assert meter.saved_now() == x.nbytes + out.nbytes + layer.weight.nbytes
    out.sum().backward()
    assert meter.saved_now() == 0 and layer.weight.grad is not None


def test_a_message_that_a_graph_saves_is_one_storage_in_the_accounted_peak():
    """A stage's input arrives as a message and its first layer saves it for backward; an output that is h itself
    is a message and saved by the heads: each is one storage, counted once in the accounted peak."""
    layer = torch.nn.Linear(50, 50)
    meter = MemoryMeter().attach([])
    x = torch.randn(200, 50)
    release = meter.hold_message([x], lambda: None)
    with meter.saving():
        out = torch.tanh(layer(x))  # saves x (the message) and its own output
        release_out = meter.hold_message([out], lambda: None)  # sent on while the graph still holds it
    assert meter.saved.peak == x.nbytes + out.nbytes and meter.messages.peak == x.nbytes + out.nbytes
    assert meter.report()["activations_peak_bytes"] == x.nbytes + out.nbytes  # not twice
    out.sum().backward()  # the graph lets go; the messages still hold both
    assert meter.live.total == x.nbytes + out.nbytes
    release(), release_out()
    assert meter.live.total == 0
    report = meter.report()
    assert report["accounted_peak_bytes"] == report["parameter_bytes"] + report["gradient_peak_bytes"] + report["optimizer_bytes"] + x.nbytes + out.nbytes
