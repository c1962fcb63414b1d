"""Config files: --config FILE.toml in, config.toml out; a rerun from it is bit-identical; bad files are one line."""

import json
import math

import pytest
import torch

from pipeline.persistence.checkpoint import load_weights
from pipeline.cli import main
from pipeline.config_file import dumps, tomllib  # tomli below Python 3.11

SMALL = ["--dataset", "synthetic", "--synthetic-train-size", "96", "--synthetic-test-size", "32", "--batch-size", "32",
         "--num-hidden", "16", "--no-progress", "--threads", "1"]
TIMINGS = {"train_samples_per_s", "wall_s", "stage_stats", "busy_fraction"}


def summary(folder) -> dict:
    values = json.loads((folder / "summary.json").read_text())
    values["config"]["run"].pop("out")
    return {k: v for k, v in values.items() if k not in TIMINGS}


def test_a_rerun_from_the_saved_config_is_bit_identical(tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["train", *SMALL, "--num-layers", "2", "--dropout", "0.2", "--nonlin", "leakyrelu", "--hidden-sizes", "16,8",
                 "--lr-decay-milestones", "1", "--epochs", "2", "--seed", "7", "--out", str(first)]) == 0
    assert main(["train", "--config", str(first / "config.toml"), "--out", str(again)]) == 0
    assert summary(first) == summary(again)
    a, b = (load_weights(str(folder)) for folder in (first, again))
    assert a.keys() == b.keys() and all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])


def test_flags_given_on_the_command_line_win_over_the_file(tmp_path):
    (tmp_path / "run.toml").write_text('num-hidden = 24\nepochs = 2\nloss = "dfa"\nbatch-norm = true\nlr = 2e-3\n')
    assert main(["train", *SMALL, "--config", str(tmp_path / "run.toml"), "--num-hidden", "8", "--no-batch-norm",
                 "--out", str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "summary.json").read_text())["config"]
    assert config["model"]["num_hidden"] == 8 and config["model"]["batch_norm"] is False  # the flags
    assert config["run"]["epochs"] == 2 and config["optim"]["lr"] == 2e-3  # the file
    assert config["optim"]["lr_decay_milestones"] == [4, 7]  # the rule's default for what neither set
    saved = tomllib.loads((tmp_path / "out" / "config.toml").read_text())
    assert saved["num-hidden"] == 8 and saved["batch-norm"] is False and saved["nonlin"] == "tanh" and saved["dfa-max-delay"] == 0


BAD_FILES = [
    ("bogus = 1\n", "unknown key 'bogus'"),
    ("num_hidden = 8\n", "unknown key 'num_hidden' (did you mean num-hidden?)"),
    ('num-hidden = "wide"\n', "num-hidden must be an integer, got str 'wide'"),
    ("epochs = 1.5\n", "epochs must be an integer, got float 1.5"),
    ("epochs = true\n", "epochs must be an integer, got bool True"),
    ("no-progress = 1\n", "no-progress must be true or false, got int 1"),
    ('lr-decay-milestones = ["4"]\n', "lr-decay-milestones must be an array of integers"),
    ("lr = [1]\n", "lr must be a number, got list"),
    ("[model]\nnum-hidden = 8\n", "[model] is a table, but the file is flat"),
    ("[training]\nepochs = 2\n", "[training] is a table, but the file is flat"),
    ("num-hidden = \n", "is not valid TOML"),
    ("lr = -0.1\n", "--lr must be > 0, got -0.1"),
    ("stages = 0\n", "--stages must be >= 1, got 0"),
]


@pytest.mark.parametrize("text,message", BAD_FILES, ids=[m for _, m in BAD_FILES])
def test_a_bad_config_file_exits_2_with_one_line(text, message, tmp_path, capsys):
    (tmp_path / "bad.toml").write_text(text)
    assert main(["train", *SMALL, "--config", str(tmp_path / "bad.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err and "Traceback" not in err


def test_a_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["train", *SMALL, "--config", str(tmp_path / "none.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.toml cannot be read" in err


def test_what_dumps_writes_reads_back_with_tomllib():
    values = {"text": 'a "quoted" \\ back\nslash é \x7f\t', "int": -3, "big": 2 ** 40, "float": 1e-300, "third": 1 / 3,
              "inf": math.inf, "yes": True, "no": False, "ints": [4, 7], "empty": [], "mixed-key": "x"}
    back = tomllib.loads(dumps({**values, "left-out": None}, header="two\nlines"))
    assert back == values


def test_a_partition_with_halves_reads_back():
    from pipeline.config_file import to_flags

    assert to_flags({"partition": [1.5, 2, 0.5]}, "x.toml") == ["--partition", "1.5,2,0.5"]
    assert to_flags({"partition": ["1.5h", 2.5]}, "x.toml") == ["--partition", "1.5h,2.5"]  # heads first
    assert to_flags({"no-batch-norm": True, "augment": False}, "x.toml") == ["--no-batch-norm", "--no-augment"]
