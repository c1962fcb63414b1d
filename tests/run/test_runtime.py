"""Runtime placement: each stage's share of the CPU cores, and its GPU."""

import os
from types import SimpleNamespace

import pytest
import torch

from pipeline.run.runtime import pin_cores, stage_device

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")


@pytest.fixture
def restored_affinity():
    cores = os.sched_getaffinity(0)
    yield sorted(cores)
    os.sched_setaffinity(0, cores)


def test_as_many_stages_as_cores_get_one_core_each(restored_affinity):
    cores = restored_affinity
    placed = []
    for rank in range(len(cores)):
        os.sched_setaffinity(0, cores)
        assert pin_cores(rank, len(cores)) == 1
        placed.append(os.sched_getaffinity(0))
    assert placed == [{core} for core in cores]


def test_fewer_stages_than_cores_get_equal_shares(restored_affinity):
    cores = restored_affinity
    if len(cores) < 2:
        pytest.skip("needs two cores")
    os.sched_setaffinity(0, cores)
    assert pin_cores(0, 1) == len(cores)
    assert os.sched_getaffinity(0) == set(cores)
    halves = len(cores) // 2
    os.sched_setaffinity(0, cores)
    assert pin_cores(1, 2) == halves
    assert os.sched_getaffinity(0) == set(cores[halves:2 * halves])


def test_more_stages_than_cores_are_left_to_the_scheduler(restored_affinity):
    cores = restored_affinity
    for rank in range(2 * len(cores) + 1):
        os.sched_setaffinity(0, cores)
        assert pin_cores(rank, 2 * len(cores) + 1) == 1
        assert os.sched_getaffinity(0) == set(cores)  # not narrowed to one core


@pytest.mark.parametrize("visible,local_rank,index", [(4, 3, 3), (8, 2, 2), (1, 3, 0), (2, 3, 1)])
def test_a_stage_takes_its_local_rank_gpu_or_the_one_it_sees(monkeypatch, visible, local_rank, index):
    """(1, 3, 0): SLURM --gpus-per-task=1 shows each process its own GPU as cuda:0."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert stage_device(SimpleNamespace(run=SimpleNamespace(device="cuda")), local_rank) == torch.device("cuda", index)


def test_a_resumed_auto_run_keeps_the_placement_of_its_checkpoint(tmp_path, monkeypatch):
    """Rank 0 would profile again and might choose otherwise; the checkpoint's stage files hold the old placement."""
    import json

    from helpers import small_config
    from pipeline.run import runtime
    from pipeline.run.plan import make_plan

    cfg = small_config(model__num_layers=2, pipeline__stages=2, pipeline__partition="auto",
                       run__checkpoint_dir=str(tmp_path), run__resume=True)
    step = tmp_path / "step-000000007"
    step.mkdir()
    files = [{"stage": 1, "file": "stage-1.pt", "size": 1.5}, {"stage": 0, "file": "stage-0.pt", "size": 1.5}]
    (step / "MANIFEST.json").write_text(json.dumps({"format": 1, "position": {}, "stages": 2, "files": files}))
    monkeypatch.setattr(runtime, "block_costs", lambda *a, **k: pytest.fail("a resumed auto run must not re-profile"))
    monkeypatch.setattr(runtime.dist, "broadcast", lambda tensor, src: None)
    placement, profile = runtime.agree_partition(make_plan(cfg), 0, 2, torch.device("cpu"))
    assert placement.sizes == (1.5, 1.5) and profile == {"resumed_placement": [1.5, 1.5]}
    # heads first: the stage that holds block 1's heads wrote its size as 1.5h
    files[1]["size"] = "1.5h"
    (step / "MANIFEST.json").write_text(json.dumps({"format": 1, "position": {}, "stages": 2, "files": files}))
    placement, profile = runtime.agree_partition(make_plan(cfg), 0, 2, torch.device("cpu"))
    assert placement.text == "1.5h,1.5" and profile == {"resumed_placement": ["1.5h", 1.5]}


def _resume_where(rank, world, port, results, roots):
    from helpers import init_gloo
    from pipeline.config import Config, RunConfig
    from pipeline.errors import AgreedError
    from pipeline.run.runtime import agree_resume

    init_gloo(rank, world, port)
    try:
        folder = agree_resume(Config(run=RunConfig(checkpoint_dir=roots[rank], resume=True)))
        results.put((rank, ("agreed", folder)))
    except AgreedError as exc:
        results.put((rank, ("refused", str(exc), None)))


@pytest.mark.timeout(120)
def test_every_rank_resumes_from_the_same_checkpoint_or_none_does(tmp_path):
    """Under torchrun each rank decides to resume from what it sees: a folder that is not shared (or a manifest one
    node does not see yet) is refused on every rank, not trained from two different states."""
    import json

    from helpers import run_ranks

    for name, step in (("shared", 20), ("other", 40)):
        (tmp_path / name / f"step-{step:09d}").mkdir(parents=True)
        (tmp_path / name / f"step-{step:09d}" / "MANIFEST.json").write_text(json.dumps({"position": {"step": step}}))
    same = run_ranks(_resume_where, 2, args=([str(tmp_path / "shared")] * 2,))
    assert [r[0] for r in same] == ["agreed"] * 2 and same[0][1:] == same[1][1:]  # one folder
    differ = run_ranks(_resume_where, 2, args=([str(tmp_path / "shared"), str(tmp_path / "other")],))
    assert [r[0] for r in differ] == ["refused"] * 2 and "do not see the same checkpoint" in differ[0][1]
