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


BAD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "networks", "bad.py")
UNLIKE = {"by_rank": "stage 0 and stage 1", "fewer_by_rank": "stage 0 and stage 1", "pooled_by_rank": "stage 0 and stage 2"}


def _ranks(rank, world, port, results):
    """What three torchrun-like ranks make of the plan, in one process group (one start-up for every case)."""
    import torch

    from pipeline.errors import AgreedError
    from pipeline.run import plan as plan_module
    from pipeline.run.runtime import agreed_blocks

    init_gloo(rank, world, port)
    seen = {}
    # every rank's config differs in its seed and its node's folders: the plan carries rank 0's seed to all
    plan = plan_module.share_plan(small_config(stages=world, run__seed=10 + rank, data__data_dir=f"/data-{rank}",
                                               run__out=f"/out-{rank}"), rank)
    seen["plan"] = [plan.cfg.run.seed, plan.token, plan.network, plan.cfg.data.data_dir, plan.cfg.run.out]
    try:
        plan_module.share_plan(small_config(model="no-such-model", stages=world), rank)
    except AgreedError as exc:
        seen["bad model"] = str(exc)
    for model in UNLIKE:
        plan = make_plan(small_config(model=f"{BAD}:{model}", stages=world))  # as the launcher makes it: no RANK
        os.environ["RANK"] = str(rank)  # what the factory reads in the stage
        try:
            seen[model] = [b.index for b in agreed_blocks(plan, rank, world, plan.placement, torch.device("cpu"))]
        except AgreedError as exc:
            seen[model] = str(exc)
        del os.environ["RANK"]

    def crash(cfg):
        raise RuntimeError("disk on fire")

    plan_module.make_plan = crash
    try:
        plan_module.share_plan(small_config(stages=world), rank)
    except (AgreedError, RuntimeError) as exc:
        seen["crash"] = f"{type(exc).__name__}: {exc}"
    results.put((rank, seen))


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_ranks, 3, timeout=90)


@pytest.mark.timeout(120)
def test_under_torchrun_rank_0s_plan_reaches_every_rank_which_keeps_its_own_folders(ranks):
    plans = [seen["plan"] for seen in ranks]
    assert [p[0] for p in plans] == [10] * 3 and len({tuple(p[1:3]) for p in plans}) == 1
    assert [p[3:] for p in plans] == [[f"/data-{r}", f"/out-{r}"] for r in range(3)]


@pytest.mark.timeout(120)
def test_a_plan_rank_0_refuses_or_fails_to_make_releases_every_rank_with_its_reason(ranks):
    assert all("unknown --model 'no-such-model'" in seen["bad model"] for seen in ranks)
    assert [seen["crash"] for seen in ranks] == ["RuntimeError: disk on fire"] + [
        "AgreedError: stage 0 could not plan the run (RuntimeError: disk on fire)"] * 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model", UNLIKE)
def test_a_stage_whose_factory_builds_otherwise_is_refused_on_every_rank(ranks, model):
    """Widths that differ, a block fewer (its build fails on one rank only), and a parameter-free step that changes a
    block's output but none of its parameters: each refused on all 3 ranks, none left waiting."""
    message = (f"--model {BAD}:{model} built different networks on different ranks ({UNLIKE[model]} differ): the "
               f"factory must depend on its context only")
    assert [seen[model] for seen in ranks] == [message] * 3
