"""On a GPU a block's update never waits for the GPU: no host sync from the non-finite guard or the loss scaler."""

import pytest
import torch

from helpers import small_config
from pipeline.block.blocks import forward_for_feedback, learn_from_error, train_blocks
from pipeline.model.feedback import output_error
from pipeline.model.factories import build_blocks
from pipeline.block.nonfinite import NonFiniteLoss, NonFiniteWatch

pytestmark = pytest.mark.cuda


@pytest.mark.timeout(120)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("loss", ["predsim", "dfa"])
def test_block_updates_do_not_sync_with_the_gpu(loss, precision):
    # [Note: deferred non-finite check]: the flags are read in watch.check() only
    cfg = small_config(loss=loss, run__device="cuda", run__precision=precision)
    blocks = build_blocks(cfg, (1, 28, 28), 10, device="cuda")
    watch = NonFiniteWatch(device="cuda").attach(blocks)
    assert watch.every > 1
    x, y = torch.randn(32, 1, 28, 28, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    *hidden, output = blocks
    for batch in range(3):  # the first steps create the optimizer state and the scalers' scale: no sync either
        watch.begin(1, batch)
        torch.cuda.set_sync_debug_mode("error")
        try:
            if loss == "dfa":
                states, out = forward_for_feedback(hidden, x)
                logits, _ = output.forward_train(out)
                output.learn(logits, y)
                learn_from_error(hidden, states, output_error(logits, y))
            else:
                train_blocks(blocks, x, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    watch.check()
    assert all(b.skipped == 0 for b in blocks)


@pytest.mark.timeout(120)
def test_a_nan_on_the_gpu_is_named_at_the_check_and_never_reaches_the_weights():
    blocks = build_blocks(small_config(run__device="cuda"), (1, 28, 28), 10, device="cuda")
    watch = NonFiniteWatch(every=4, device="cuda").attach(blocks)
    x, y = torch.randn(32, 1, 28, 28, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    before = [p.clone() for p in blocks[0].parameters()]
    watch.begin(1, 0)
    train_blocks(blocks, x * float("nan"), y)
    assert all(torch.equal(p, q) for p, q in zip(blocks[0].parameters(), before))
    with pytest.raises(NonFiniteLoss, match=r"^epoch 1 batch 0, block 0: loss is not finite"):
        watch.check()
