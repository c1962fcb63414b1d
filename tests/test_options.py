"""The train options come from the config dataclasses: every field is a flag, a help line and a file key, and a
config goes through its config.toml and back unchanged."""

import dataclasses
from dataclasses import dataclass

import pytest

from pipeline import options as options_module
from pipeline.cli import build_parser, command_parser
from pipeline.errors import ConfigError
from pipeline.config import Config, DataConfig, LossConfig, ModelConfig, OptimConfig, PipelineConfig, RunConfig
from pipeline.config_file import dumps, to_flags, tomllib
from pipeline.options import SECTIONS, config_from_args, file_values, options

# every train flag of the hand-written parser this generator replaced: none may go
FLAGS_BEFORE = """--model --num-layers --num-hidden --hidden-sizes --feat-mult --nonlin --dropout --batch-norm --no-batch-norm
--loss --bio --beta --dim-in-decoder --target-proj-size --no-similarity-std --sim-pool --sim-dim
--no-feedback-normalization --optim --lr --momentum --weight-decay --lr-decay-milestones --lr-decay-fact --dataset
--data-dir --no-download --batch-size --augment --no-augment --synthetic-like --synthetic-train-size
--synthetic-test-size --limit-train-batches --limit-eval-batches --stages --partition --transport --queue-depth
--stage-order --zmq-host --zmq-curve-keys --master-port --dist-backend --stall-timeout --dfa-sync --heads-max-delay
--dfa-max-delay --epochs --seed --device --threads --out --config --eval-every --no-progress --tensorboard
--warmup-batches --skip-nonfinite --precision --deterministic --checkpoint-dir --checkpoint-every --resume
--auto-resume --max-restarts --log-alignment""".split()

# two configs that between them set every field away from its default (checked below, so a new field joins them)
LOCAL = Config(
    model=ModelConfig(name="vgg6a", hidden_sizes=(16, 8), num_hidden=32, feat_mult=0.5, nonlin="leakyrelu", dropout=0.1,
                      batch_norm=False),
    loss=LossConfig(loss="pred", bio=True, beta=0.5, dim_in_decoder=512, target_proj_size=64, similarity_std=False,
                    sim_pool=2, sim_dim=8),
    optim=OptimConfig(optim="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, lr_decay_milestones=(3, 5), lr_decay_fact=0.5),
    data=DataConfig(dataset="synthetic", data_dir="/data", download=False, batch_size=16, augment=False,
                    synthetic_like="cifar10", synthetic_train_size=64, synthetic_test_size=32, limit_train_batches=3,
                    limit_eval_batches=2),
    pipeline=PipelineConfig(stages=3, partition=(1, "1.5h", 1.5), transport="zmq", queue_depth=2, stage_order="lean",
                            dfa_max_delay=None, heads_max_delay=1, stall_timeout=60.5, zmq_host="0.0.0.0",
                            zmq_curve_keys="/keys", master_port=1234),
    run=RunConfig(epochs=3, seed=5, device="cuda", threads=2, out="/out", progress=False, eval_every=7, log_alignment=4,
                  checkpoint_dir="/ckpt", checkpoint_every=2, checkpoint_unit="epoch", resume=True, auto_resume=True,
                  max_restarts=2, warmup_batches=3, skip_nonfinite=True, precision="bf16", alignment_batches=5,
                  tensorboard="/tb", deterministic=True))
DFA = Config(loss=LossConfig(loss="dfa", feedback_normalization=False),
             pipeline=PipelineConfig(stages=2, partition=(1.5, 1.5), dfa_sync=True, dist_backend="gloo"),
             run=RunConfig(checkpoint_dir="/ckpt", checkpoint_every=500))


def train_parser():
    return command_parser(build_parser(), "train")


def through_the_file(cfg: Config) -> Config:
    """cfg -> its config.toml text -> TOML values -> flags -> parsed -> Config, as `train --config` reads it."""
    values = tomllib.loads(dumps(file_values(cfg)))
    parser = build_parser()
    return config_from_args(parser.parse_args(["train", *to_flags(values, "x.toml")]))


def test_every_flag_of_the_hand_written_parser_is_still_there():
    flags = {f for action in train_parser()._actions for f in action.option_strings}
    assert not set(FLAGS_BEFORE) - flags
    # --align-batches, once align's own, is now also train's (for --log-alignment), each with its default
    assert build_parser().parse_args(["align"]).alignment_batches == 4
    assert build_parser().parse_args(["train"]).alignment_batches == RunConfig().alignment_batches == 2


def test_every_field_is_an_option_but_the_unit_its_count_carries():
    fields = {f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
    assert fields - {o.name for o in options()} == {"checkpoint_unit"}


def test_the_two_configs_set_every_field_away_from_its_default():
    unset = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            if all(getattr(getattr(cfg, section), f.name) == default for cfg in (LOCAL, DFA)):
                unset.append(f"{section}.{f.name}")
    assert unset == []


@pytest.mark.parametrize("cfg", [LOCAL, DFA, Config()], ids=["local", "dfa", "defaults"])
def test_a_config_goes_through_its_file_and_back_unchanged(cfg):
    assert through_the_file(cfg).to_dict() == cfg.to_dict()


def test_a_field_added_to_a_section_is_a_flag_a_help_line_and_a_file_key(monkeypatch, capsys):
    @dataclass(kw_only=True, slots=True)
    class WithKnob(RunConfig):
        knob_width: int = 3
        """How wide the knob is, against --epochs."""

    monkeypatch.setitem(SECTIONS, "run", WithKnob)
    args = build_parser().parse_args(["train", "--knob-width", "5"])
    assert config_from_args(args).run.knob_width == 5
    assert file_values(Config(run=WithKnob(knob_width=7)))["knob-width"] == 7
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--knob-width KNOB_WIDTH How wide the knob is, against --epochs (default 3)" in help_text


def test_field_names_in_help_are_written_as_flags():
    helps = {a.dest: a.help for a in train_parser()._actions}
    assert "--num-layers and --num-hidden" in helps["hidden_sizes"] and "--data-dir" in helps["download"]


def test_a_field_of_a_type_the_generator_cannot_parse_is_refused_when_the_options_are_made(monkeypatch):
    @dataclass(kw_only=True, slots=True)
    class WithPairs(RunConfig):
        pairs: tuple[int, ...] = ()
        """Pairs with no parser."""

    monkeypatch.setitem(options_module.SECTIONS, "run", WithPairs)
    with pytest.raises(TypeError, match="WithPairs.pairs: a tuple"):
        options()


def test_align_reads_its_own_keys_and_keeps_its_own_default_from_a_train_runs_file(tmp_path):
    from pipeline.cli import COMMAND_KEYS

    values = tomllib.loads(dumps(file_values(Config())))  # the config.toml of a run that did not measure alignment
    assert "align-batches" not in values and file_values(LOCAL)["align-batches"] == 5
    values.update({"align-every": 10, "load": "run"})
    args = build_parser().parse_args(["align", *to_flags(values, "x.toml", COMMAND_KEYS["align"])])
    assert (args.align_every, args.load, args.alignment_batches) == (10, "run", 4)
    with pytest.raises(ConfigError, match="unknown key 'align-every'"):
        to_flags({"align-every": 10}, "x.toml", COMMAND_KEYS["train"])
    with pytest.raises(ConfigError, match="align-every must be an integer"):
        to_flags({"align-every": "ten"}, "x.toml", COMMAND_KEYS["align"])


def test_help_names_sections_and_defaults_and_keeps_flags_whole(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    assert "learning rule:" in out and "optimizer:" in out
    assert "--stages STAGES" in out and "its WORLD_SIZE (default 1)" in " ".join(out.split())
    assert not [line for line in out.splitlines() if line.rstrip().endswith("-") and "--" in line.split()[-1]]
