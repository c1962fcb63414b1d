"""--tensorboard: event files that TensorBoard's own reader reads back with the expected tags; a missing package exits 2."""

import importlib.util
import json

import pytest

from pipeline.cli import main

SMALL = ["--dataset", "synthetic", "--synthetic-train-size", "128", "--synthetic-test-size", "32", "--batch-size", "32",
         "--num-layers", "2", "--num-hidden", "16", "--no-progress", "--threads", "1", "--epochs", "2"]


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_sequential_runs_events_read_back_with_the_expected_tags(tmp_path):
    pytest.importorskip("tensorboard")
    assert main(["train", *SMALL, "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")]) == 0
    read = scalars(tmp_path / "tb")
    assert set(read) == {"test_error/layer_0", "test_error/layer_1", "test_error/output", "train_loss/block_0",
                         "train_loss/block_1", "train_loss/output", "train_error/block_0", "train_error/block_1",
                         "train_error/output", "samples_per_s", "lr", "final/test_error", "final/samples_per_s"}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in read["test_error/layer_1"]] == [1, 2]
    assert read["test_error/output"][-1][1] == pytest.approx(records[-1]["test_error"], rel=1e-6)  # stored as float32
    assert read["train_loss/block_0"][0][1] == pytest.approx(records[0]["layer_train_losses"][0], rel=1e-6)


def test_a_pipelines_events_have_every_stages_busy_fraction(tmp_path):
    """Two stages (as threads: the last stage writes the events wherever its stages run)."""
    pytest.importorskip("tensorboard")
    from pipeline.cli import build_parser, config_from_args
    from pipeline.run.in_process import run_in_process

    run_in_process(config_from_args(build_parser().parse_args(
        ["train", *SMALL, "--stages", "2", "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")])))
    read = scalars(tmp_path / "tb")
    busy = json.loads((tmp_path / "run" / "summary.json").read_text())["busy_fraction"]
    assert [read[f"busy_fraction/stage_{k}"][0][1] for k in (0, 1)] == pytest.approx(busy, rel=1e-6)
    assert {"test_error/layer_0", "test_error/output", "samples_per_s"} <= set(read)


def test_without_the_tensorboard_package_the_flag_exits_2_with_one_line(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert main(["train", *SMALL, "--tensorboard", str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'" in err
