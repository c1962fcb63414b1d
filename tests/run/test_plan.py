"""The run plan is made once and handed to every stage: no stage repeats the dry run, and under torchrun rank 0's
plan (or its reason for refusing the run) reaches every rank."""

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
