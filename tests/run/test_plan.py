"""The run plan is made once and handed to every stage: no stage repeats the dry run, and under torchrun rank 0's
plan (or its reason for refusing the run) reaches every rank."""

import os

import pytest

from helpers import init_gloo, run_ranks, small_config
from pipeline.model import factories
from pipeline.run.in_process import run_in_process
from pipeline.run.plan import make_plan


def test_a_pipeline_dry_runs_its_network_once_for_all_its_stages(tmp_path, monkeypatch):
    """K = 3 stages (one split block), a checkpoint every 4 batches: the plan's dry run is the only one."""
    calls = []
    real = factories.network_shape
    monkeypatch.setattr(factories, "network_shape", lambda *a: calls.append(1) or real(*a))
    cfg = small_config(stages=3, pipeline__partition=(1.5, 0.5, 1), data__limit_train_batches=8,
                       run__checkpoint_dir=str(tmp_path), run__checkpoint_every=4)
    run_in_process(cfg)
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000000004", "step-000000008"]


def test_the_plan_holds_the_placement_and_what_the_attempt_resumes_from(tmp_path):
    from pipeline.run.restarts import resolve_resume

    cfg = small_config(stages=2, pipeline__partition=(1.5, 1.5), data__limit_train_batches=4,
                       run__checkpoint_dir=str(tmp_path), run__checkpoint_every=4)
    plan = make_plan(cfg)
    assert (plan.placement.text, plan.resume_from, plan.blocks, plan.splittable) == ("1.5,1.5", None, 3, ())
    run_in_process(cfg)
    again = make_plan(resolve_resume(small_config(stages=2, pipeline__partition=(1.5, 1.5), run__auto_resume=True,
                                                  run__checkpoint_dir=str(tmp_path)), 0))
    assert again.resume_from == str(tmp_path / "step-000000004") and again.token != plan.token
    auto = make_plan(small_config(stages=2, pipeline__partition="auto"))
    assert auto.placement is None and auto.splittable == (True, True, False)  # the output block is never split


def _shared(rank, world, port, results, bad):
    from pipeline.errors import AgreedError
    from pipeline.run.plan import share_plan

    init_gloo(rank, world, port)
    # every rank's config differs in its seed: the plan carries rank 0's to all
    cfg = small_config(model="no-such-model" if bad else "mlp", stages=world, run__seed=10 + rank)
    try:
        plan = share_plan(cfg, rank)
        results.put((rank, ("plan", plan.cfg.run.seed, plan.token, plan.network)))
    except AgreedError as exc:
        results.put((rank, ("refused", str(exc), None, None)))


@pytest.mark.timeout(120)
def test_under_torchrun_rank_0s_plan_reaches_every_rank():
    shared = run_ranks(_shared, 3, args=(False,))
    assert [r[0] for r in shared] == ["plan"] * 3 and len({r[1:] for r in shared}) == 1 and shared[0][1] == 10
    refused = run_ranks(_shared, 3, args=(True,))
    assert [r[0] for r in refused] == ["refused"] * 3 and "unknown --model 'no-such-model'" in refused[2][1]


def _shared_keeps_local(rank, world, port, results):
    from pipeline.run.plan import share_plan

    init_gloo(rank, world, port)
    cfg = small_config(stages=world, data__data_dir=f"/data-{rank}", run__out=f"/out-{rank}", run__seed=10 + rank)
    plan = share_plan(cfg, rank)
    results.put((rank, (plan.cfg.data.data_dir, plan.cfg.run.out, plan.cfg.run.seed)))


@pytest.mark.timeout(120)
def test_each_rank_keeps_where_its_node_reads_and_writes():
    assert run_ranks(_shared_keeps_local, 2) == [("/data-0", "/out-0", 10), ("/data-1", "/out-1", 10)]


def _plan_crashes(rank, world, port, results):
    from pipeline.errors import AgreedError
    from pipeline.run import plan as plan_module

    init_gloo(rank, world, port)

    def crash(cfg):
        raise RuntimeError("disk on fire")

    plan_module.make_plan = crash
    try:
        plan_module.share_plan(small_config(stages=world), rank)
    except (AgreedError, RuntimeError) as exc:
        results.put((rank, (type(exc).__name__, str(exc))))


@pytest.mark.timeout(120)
def test_a_plan_that_fails_on_rank_0_for_any_reason_releases_every_rank_with_it():
    assert run_ranks(_plan_crashes, 3) == [("RuntimeError", "disk on fire")] + [
        ("AgreedError", "stage 0 could not plan the run (RuntimeError: disk on fire)")] * 2


def _agree_blocks(rank, world, port, results, model):
    import os

    import torch

    from pipeline.errors import AgreedError
    from pipeline.run.runtime import agreed_blocks

    init_gloo(rank, world, port)
    plan = make_plan(small_config(model=model, stages=world))  # as the launcher makes it: no RANK there
    os.environ["RANK"] = str(rank)  # what the factory reads in the stage
    try:
        blocks = agreed_blocks(plan, rank, world, plan.placement, torch.device("cpu"))
        results.put((rank, ("built", [b.index for b in blocks])))
    except AgreedError as exc:
        results.put((rank, ("refused", str(exc))))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model,pair", [("by_rank", "stage 0 and stage 1"), ("fewer_by_rank", "stage 0 and stage 1"),
                                        ("pooled_by_rank", "stage 0 and stage 2")])
def test_a_stage_whose_factory_builds_otherwise_is_refused_on_every_rank(model, pair):
    """Widths that differ, a block fewer (its build fails on one rank only), and a parameter-free step that changes a
    block's output but none of its parameters: each refused on all 3 ranks, none left waiting."""
    name = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "networks", "bad.py") + f":{model}"
    results = run_ranks(_agree_blocks, 3, args=(name,))
    message = (f"--model {name} built different networks on different ranks ({pair} differ): the factory must "
               f"depend on its context only")
    assert results == [("refused", message)] * 3
