"""The train options, generated from the config dataclasses: each field is one flag, one --help line, one file key.

An option is written once, as a field of a section of pipeline/config.py with its docstring below it:
- the flag is the field's name with dashes (`num_hidden` -> `--num-hidden`);
- its type comes from the annotation, its --help from the docstring, its default from the field;
- a boolean that is off by default is a switch (`--bio`), one that is on by default is turned off (`--no-download`),
  one whose default depends on the learning rule goes both ways (`--batch-norm`, `--no-batch-norm`);
- `field(metadata=...)` says where a field differs: another spelling (`flag`: `--model` for model.name, None for
  none), a parser of its own (`parse`: `--partition 1.5h,2.5`, `--checkpoint-every 2e`, `--dfa-max-delay none`),
  `nargs`, `metavar`, `unset` for a default worked out later (the stage count under torchrun), and `written_with`
  for a field a config file holds only where that other field is set (align's held-out batches: align keeps
  its own default where a train run did not measure alignment).
The config file's keys are the flags without their dashes (pipeline/config_file.py reads them off this parser),
and the config.toml a run writes comes from its Config through `file_values`: a new field is a new flag, a new
help line and a new key at once.

Written on argparse rather than with tyro, which torchtitan uses: the flags keep the spellings that scripts and
saved configs already use, the options whose default depends on the learning rule need a resolution step of their
own, and bad input stays one line and exit code 2 (pipeline/cli.py); the generator is what follows.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.config import (Config, DataConfig, LossConfig, ModelConfig, OptimConfig, PipelineConfig, RunConfig,
                             RULE_DEFAULTS, rule_defaults)
from pipeline.errors import ConfigError

SECTIONS = {"model": ModelConfig, "loss": LossConfig, "optim": OptimConfig, "data": DataConfig,
            "pipeline": PipelineConfig, "run": RunConfig}
BASE_DEFAULTS = rule_defaults("predsim")  # the options whose default depends on the rule, at a local rule's
TITLES = {"loss": "learning rule", "optim": "optimizer"}  # the --help group of a section, where not its name


class _Unset:
    """The parsed default of an option whose default is worked out after parsing (the rule's, the world size)."""

    def __repr__(self) -> str:
        return "unset"


UNSET = _Unset()


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 2,1,1, got '{text}'") from None


def _size(part: str) -> float | str:
    """One --partition entry: a number, or a half marked h, kept as text for Placement.parse."""
    number = float(part[:-1] if part.endswith("h") else part)
    return part if part.endswith("h") else number


def partition(text: str) -> tuple[float | str, ...] | str:
    if text == "auto":
        return text
    try:
        return tuple(_size(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block counts like 2,1,1 (halves split a block: 1.5,2.5, or with its "
                                         f"heads first: 1.5h,2.5) or auto, got '{text}'") from None


def every(text: str) -> tuple[int, str]:
    """`--checkpoint-every`: a count of batches (500) or of epochs (2e), as (count, unit)."""
    unit = "epoch" if text.endswith("e") else "batch"
    try:
        return int(text[:-1] if unit == "epoch" else text), unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count of batches (500) or epochs (2e), got '{text}'") from None


def optional_int(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got '{text}'") from None


PARSERS: dict[str, Callable[[str], Any]] = {"int_list": int_list, "partition": partition, "every": every,
                                            "optional_int": optional_int}


@dataclass(frozen=True)
class Option:
    """One field of a config section as a command-line option."""

    section: str
    field: dataclasses.Field
    kind: type  # bool, int, float or str: the annotation without its None
    doc: str

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def flag(self) -> str:
        spelled = self.field.metadata.get("flag", "")
        if spelled:
            return spelled
        negated = self.kind is bool and self.field.default is True and not self.rule_dependent
        return f"--{'no-' if negated else ''}{self.name.replace('_', '-')}"

    @property
    def key(self) -> str:
        """Its config-file key: the flag without its dashes."""
        return self.flag[2:]

    @property
    def rule_dependent(self) -> bool:
        return self.name in BASE_DEFAULTS


@functools.cache
def _docstrings(cls: type) -> dict[str, str]:
    """The docstring below each field of a dataclass and of the dataclasses it extends (the source's string after
    `name: type = ...`; Python keeps no such docstring at run time)."""
    found: dict[str, str] = {}
    for owner in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(owner))).body[0].body
        except (OSError, TypeError):  # no source (a frozen build): its options go without help
            continue
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                found[node.target.id] = " ".join(after.value.value.split())
    return found


def _kind(annotation: Any) -> type:
    """bool, int, float or str from a field's annotation (None stripped); another type needs a parser of its own."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    return annotation if annotation in (bool, int, float, str) else object


def _item_kind(annotation: Any) -> type:
    """The type of a `tuple[int, ...]` field's items (for an option that takes several values)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    tuples = [a for a in args if typing.get_origin(a) is tuple] or [annotation]
    return _kind(typing.get_args(tuples[0])[0])


def options() -> list[Option]:
    """Every train option, section by section, in the fields' order."""
    found = []
    for section, cls in SECTIONS.items():
        hints, docs = typing.get_type_hints(cls), _docstrings(cls)
        for f in dataclasses.fields(cls):
            if "flag" in f.metadata and f.metadata["flag"] is None:
                continue  # set through another field's option (checkpoint_unit, by --checkpoint-every's e)
            option = Option(section, f, _kind(hints[f.name]), docs.get(f.name, ""))
            if option.kind is object and not {"parse", "nargs"} & set(f.metadata):
                raise TypeError(f"{cls.__name__}.{f.name}: a {hints[f.name]} field needs metadata parse or nargs")
            found.append(option)
    dests = [o.name for o in found]
    assert len(dests) == len(set(dests)), "every option's field name is unique across the sections"
    return found


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _help(option: Option, flags: dict[str, str]) -> str:
    """The docstring, its field names written as flags, with the default (and the rules' own defaults) after it."""
    text = re.sub(r"\b[a-z]+(?:_[a-z]+)+\b", lambda m: flags.get(m.group(), m.group()), option.doc).rstrip(".")
    text = text.replace("%", "%%")  # argparse fills in %(default)s
    if option.rule_dependent:
        rules = "".join(f"; under --loss {rule}: {_show(values[option.name])}" for rule, values in RULE_DEFAULTS.items()
                        if option.name in values)
        return f"{text} (default {_show(BASE_DEFAULTS[option.name])}{rules})"
    if option.kind is bool and option.flag.startswith("--no-"):
        lowered = text[:1].lower() + text[1:] if text[1:2].islower() else text  # not DFA's D
        return f"turn off (on by default): {lowered}"
    if option.field.metadata.get("unset"):
        return f"{text} (default {option.field.default})"
    return text


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows every option's default (the rule-dependent ones and switches spell theirs out)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or any(action.default is v for v in (None, False, True, UNSET, argparse.SUPPRESS))
                or not action.option_strings):
            return text
        return f"{text} (default %(default)s)".lstrip()

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)  # --dfa-max-delay stays whole


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """Every train option, grouped by section (the section's docstring heads its group)."""
    all_options = options()
    flags = {o.name: o.flag for o in all_options}
    groups = {section: parser.add_argument_group(TITLES.get(section, section), cls.__doc__) for section, cls in SECTIONS.items()}
    for option in all_options:
        meta, default = option.field.metadata, option.field.default
        how: dict[str, Any] = {"dest": option.name, "help": _help(option, flags)}
        if "metavar" in meta:
            how["metavar"] = meta["metavar"]
        if option.rule_dependent or meta.get("unset"):
            default = UNSET
        if option.kind is bool and option.rule_dependent:
            how["action"] = argparse.BooleanOptionalAction
        elif option.kind is bool:
            how["action"] = "store_false" if option.flag.startswith("--no-") else "store_true"
        elif "nargs" in meta:
            how.update(nargs=meta["nargs"], type=_item_kind(typing.get_type_hints(SECTIONS[option.section])[option.name]))
        else:
            how["type"] = PARSERS[meta["parse"]] if "parse" in meta else option.kind
        groups[option.section].add_argument(option.flag, default=default, **how)
    groups["run"].add_argument("--config", default=None, metavar="FILE.toml",
                               help="train options from a TOML file, keys named like the flags (num-hidden = 800); "
                                    "flags given here win")


def torchrun_world() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def config_from_args(args: argparse.Namespace) -> Config:
    """The checked Config of parsed train options: what was left unset takes the rule's default (or the world's)."""
    rule = rule_defaults(args.loss)
    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for option in options():
        value = getattr(args, option.name)
        if value is UNSET and option.rule_dependent:
            value = rule[option.name]
        unit = option.field.metadata.get("unit")
        if unit is not None:  # --checkpoint-every 2e: the count and its unit
            value, values[option.section][unit] = value if value is not None else (None, "batch")
        values[option.section][option.name] = tuple(value) if isinstance(value, list) else value
    world, stages = torchrun_world(), values["pipeline"]["stages"]
    if world is not None:
        if stages is not UNSET and stages != world[1]:
            raise ConfigError(f"--stages {stages} but torchrun started {world[1]} processes: drop --stages or match them")
        if values["run"]["max_restarts"]:
            raise ConfigError("--max-restarts is the local launcher's: under torchrun give torchrun --max-restarts N")
        stages = world[1]
    values["pipeline"]["stages"] = PipelineConfig().stages if stages is UNSET else stages
    return Config(**{section: cls(**values[section]) for section, cls in SECTIONS.items()})


def file_values(cfg: Config) -> dict[str, Any]:
    """Every train option of a config as its file key and value: the config.toml that reruns it."""
    values: dict[str, Any] = {}
    for option in options():
        section = getattr(cfg, option.section)
        value = getattr(section, option.name)
        unit = option.field.metadata.get("unit")
        written_with = option.field.metadata.get("written_with")
        if written_with is not None and getattr(section, written_with) is None:
            continue
        if option.kind is bool and not option.rule_dependent:
            if value == (option.field.default is True):
                continue  # the switch left as it is: leaving its key out says so
            value = True
        elif unit is not None and value is not None:
            value = f"{value}e" if getattr(section, unit) == "epoch" else value
        elif option.field.metadata.get("parse") == "optional_int" and value is None:
            value = "none"
        values[option.key] = list(value) if isinstance(value, tuple) else value
    return values
