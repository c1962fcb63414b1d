"""The plot command: PNGs of per-layer test error, per-block loss and stage time, several runs overlaid."""

import subprocess
import sys

import pytest

from pipeline.cli import main
from pipeline.observe.plots import STAGE_PARTS, read_run, stage_fractions

SMALL = ["--dataset", "synthetic", "--synthetic-train-size", "128", "--synthetic-test-size", "32", "--batch-size", "32",
         "--num-layers", "2", "--num-hidden", "16", "--no-progress", "--threads", "1", "--epochs", "2"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", *SMALL, "--out", str(root / "seq")]) == 0
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", *SMALL, "--loss", "dfa", "--stages", "2",
                           "--transport", "local", "--out", str(root / "dfa")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return root


def test_plot_overlays_runs_into_three_pngs(runs, tmp_path, capsys):
    assert main(["plot", str(runs / "seq"), str(runs / "dfa"), "--out", str(tmp_path)]) == 0
    names = ("layer_test_error.png", "block_train_loss.png", "stage_time.png")
    assert capsys.readouterr().out.count("wrote ") == 3
    for name in names:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
    assert read_run(str(runs / "dfa")).label == "dfa (dfa, K=2)"


def test_a_sequential_run_alone_has_no_stage_plot(runs, tmp_path):
    assert main(["plot", str(runs / "seq"), "--out", str(tmp_path), "--labels", "reference"]) == 0
    assert (tmp_path / "layer_test_error.png").exists() and not (tmp_path / "stage_time.png").exists()


def test_stage_fractions_are_shares_of_wall_time():
    stats = {"wall_s": 10.0, "compute_s": 4.0, "wait_s": 3.0, "error_wait_s": None, "blocked_s": 1.0, "send_s": 2.0}
    assert dict(zip([n for n, _ in STAGE_PARTS], stage_fractions(stats))) == {
        "busy": 0.4, "waiting for input": 0.3, "waiting for DFA errors": 0.0, "blocked on output": 0.1, "sending (own thread)": 0.2}


@pytest.mark.parametrize("case,message", [("missing", "no readable metrics.jsonl"), ("damaged", "is damaged"),
                                          ("labels", "--labels has 2 names for 1 runs")])
def test_bad_plot_input_exits_2_with_one_line(case, message, runs, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    if case == "damaged":
        (run / "metrics.jsonl").write_text("{not json\n")
    if case == "labels":
        run = runs / "seq"
    extra = ["--labels", "a", "b"] if case == "labels" else []
    assert main(["plot", str(run), "--out", str(tmp_path / "png"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
