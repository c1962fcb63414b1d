"""--precision: bf16/fp16 forwards with fp32 losses and weights; fp32 exactly the plain PyTorch update."""

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import small_config
from pipeline.model import losses
from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.model.factories import build_blocks
from pipeline.sequential import SequentialTrainer


def _blocks(**kw):
    return build_blocks(small_config(**kw), (1, 28, 28), 10)


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
@pytest.mark.parametrize("model", ["mlp", "vgg8b"])
def test_a_block_hands_on_its_compute_dtype_and_learns_from_an_fp32_loss(precision, dtype, model):
    blocks = _blocks(model=model, model__feat_mult=0.0625, run__precision=precision)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))  # the very first input stays fp32
    for block in blocks[:-1]:
        h, out = block.forward_train(x)
        assert h.dtype == out.dtype == dtype
        with block.precision.autocast():
            loss, logits = block.heads.loss(h, y)
        assert loss.dtype == logits.dtype == torch.float32
        block.learn(h, y)
        assert all(p.dtype == torch.float32 and p.grad is None for p in block.parameters())  # stepped and cleared
        assert block.stats.loss_sum.dtype == torch.float32
        x = out.detach()
    logits, _ = blocks[-1].forward_train(x)
    assert logits.dtype == dtype
    blocks[-1].learn(logits, y)
    out, hits = blocks[0].evaluate(torch.randn(8, 1, 28, 28), y)  # evaluation under the same autocast
    assert out.dtype == dtype and hits.dtype == torch.int64


def test_only_fp16_has_loss_scalers():
    assert all(b.scaler is None for b in _blocks()) and all(b.scaler is None for b in _blocks(run__precision="bf16"))
    scalers = [b.scaler for b in _blocks(run__precision="fp16")]
    assert all(isinstance(s, torch.amp.GradScaler) for s in scalers) and len({id(s) for s in scalers}) == len(scalers)


@pytest.mark.parametrize("loss", ["predsim", "dfa"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_reduced_precision_run_learns_the_synthetic_task(loss, precision):
    cfg = small_config(loss=loss, run__epochs=3, data__synthetic_train_size=512, optim__lr=5e-3, run__precision=precision)
    summary = SequentialTrainer(cfg).run()
    assert summary["test_error"] < 50.0, summary  # chance is 90%
    assert summary["skipped_updates"] == {}


def test_fp32_is_the_plain_pytorch_update_bit_for_bit():
    # the default path: no autocast, no scaler, and the guard's found_inf of 0 must not change a bit
    trainer = SequentialTrainer(small_config(model__dropout=0.0))
    assert trainer.cfg.run.precision == "fp32"
    reference = copy.deepcopy(trainer.blocks)
    optimizers = [torch.optim.Adam(b.parameters(), lr=trainer.cfg.optim.lr, fused=True) for b in reference]
    beta = trainer.cfg.loss.beta
    for batch in list(trainer.source.train_batches(1))[:3]:
        trainer.train_batch(batch.x, batch.y)
        x, y = batch.x, batch.y
        *hidden, output = reference
        for block, optimizer in zip(hidden, optimizers):
            h = F.leaky_relu(block.norm(block.layer(x.flatten(1))), 0.01)
            target = losses.similarity_matrix(F.one_hot(y, 10).float())
            pred = F.cross_entropy(block.heads.decoder(h), y)
            sim = F.mse_loss(losses.similarity_matrix(block.heads.sim_map(h)), target)
            ((1 - beta) * pred + beta * sim).backward()
            optimizer.step()
            optimizer.zero_grad()
            x = h.detach()
        ((1 - beta) * F.cross_entropy(output.layer(x), y)).backward()
        optimizers[-1].step()
        optimizers[-1].zero_grad()
    for mine, theirs in zip(trainer.blocks, reference):
        for (name, p), q in zip(mine.named_parameters(), theirs.parameters()):
            assert torch.equal(p, q), (mine.index, name)


@pytest.mark.parametrize("loss,transport,partition", [
    ("predsim", "zmq", None), ("dfa", "dist", None),
    ("predsim", "threads", (1.5, 2.5)),  # block 1's bf16 h and fp32 dL/dh between its halves
    ("predsim", "threads", ("1.5h", 2.5))])
def test_bf16_k_stages_match_the_sequential_bf16_run(loss, transport, partition, tmp_path):
    # the bf16 activations (and fp32 DFA errors) cross the processes; every block computes what it computes alone
    from helpers import run_pipeline
    from pipeline.persistence.checkpoint import load_weights

    def cfg(out, stages):
        return small_config(loss=loss, stages=stages, model__num_layers=3, data__batch_size=16, data__synthetic_train_size=160,
                            data__synthetic_test_size=48, run__precision="bf16", run__out=str(out),
                            pipeline__dfa_sync=loss == "dfa", pipeline__partition=partition if stages > 1 else None)

    SequentialTrainer(cfg(tmp_path / "seq", 1)).run()
    summary = run_pipeline(cfg(tmp_path / "k2", 2), transport)
    assert summary["partition"] == list(partition or (2, 2))
    ref, mine = load_weights(str(tmp_path / "seq")), load_weights(str(tmp_path / "k2"))
    assert sorted(ref) == sorted(mine)
    for index, state in ref.items():
        for name, value in state.items():
            assert torch.equal(value, mine[index][name]), (index, name)


def test_a_non_finite_fp16_loss_with_finite_gradients_is_still_skipped():
    # a NaN added to the loss leaves the gradients finite, so the scaler's own check would let the step through
    block = _blocks(run__precision="fp16", model__dropout=0.0)[0]
    block.skip_nonfinite = True
    before = [p.clone() for p in block.parameters()]
    real = block.heads.loss
    block.heads.loss = lambda h, y: (real(h, y)[0] + float("nan"), None)
    block.learn(block.forward_train(torch.randn(8, 1, 28, 28))[0], torch.randint(0, 10, (8,)))
    assert block.skipped == 1
    assert all(torch.equal(p, q) for p, q in zip(block.parameters(), before))


@pytest.mark.parametrize("args,message", [
    (["--precision", "fp8"], "unknown --precision 'fp8': choose one of fp32, bf16, fp16"),
    (["--precision", "fp16", "--loss", "backprop"], "--precision fp16 scales each block's own loss"),
])
def test_bad_precision_exits_2_with_one_line(args, message, capsys):
    assert main(["train", "--dataset", "synthetic", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_precision_is_checked_in_the_config():
    with pytest.raises(ConfigError, match="--precision"):
        small_config(run__precision="half")
