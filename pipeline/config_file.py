"""Config files: a TOML file of train options (keys named like the flags) in, the config.toml that reproduces a run out.

`--config run.toml` turns the file into the flags it stands for, put before the command line's own, so that
flags given on the command line win. Every run writes `config.toml` into --out with every option's resolved
value (the learning rule's defaults included), and `train --config RUN/config.toml` reruns it. The keys and
what each must hold come from the options, which come from the config's fields (pipeline/options.py).

The file is read with the standard library's tomllib (Python >= 3.11; the tomli backport below that). It is
written by `dumps` below rather than by tomli-w: the file is flat `key = value` lines of strings, numbers,
booleans and arrays of numbers, which takes twenty lines, and the tests read every written value back with tomllib.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from pipeline.config import ConfigError
from pipeline.options import Option, options

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the backport, where the standard library lacks it
    import tomli as tomllib

def config_path(argv: list[str]) -> str | None:
    """The FILE of `--config FILE` (or `--config=FILE`) in a command line, if any."""
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None


def keys() -> dict[str, Option]:
    """Every train option by its file key: the flag without its dashes (num-hidden, no-progress; batch-norm and
    no-batch-norm for an option that goes both ways)."""
    found = {}
    for option in options():
        found[option.key] = option
        if option.kind is bool and option.rule_dependent:
            found[f"no-{option.key}"] = option
    return found


def read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"--config {path} cannot be read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path} is not valid TOML: {exc}") from None


def _kind(option: Option) -> str:
    """What a key's value must be: bool, int, float, str, ints (an array of integers) or any (the flag's own parser)."""
    if option.kind is bool:
        return "bool"
    if "nargs" in option.field.metadata:
        return "ints"
    if "parse" in option.field.metadata:
        return "any"
    return {int: "int", float: "float", str: "str"}[option.kind]


def _matches(kind: str, value: Any) -> bool:
    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    ints = isinstance(value, list) and all(integer(v) for v in value)
    # --partition 1.5,2.5 or 1.5h,2.5
    numbers = isinstance(value, list) and all(integer(v) or isinstance(v, (float, str)) for v in value)
    return {"bool": isinstance(value, bool), "int": integer(value), "str": isinstance(value, str),
            "float": integer(value) or isinstance(value, float), "ints": ints,
            "any": isinstance(value, str) or integer(value) or numbers}[kind]


KIND_NAMES = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
              "ints": "an array of integers", "any": "a string, an integer or an array of numbers (or strings like \"1.5h\")"}


def to_flags(values: dict[str, Any], path: str, own: dict[str, type] | None = None) -> list[str]:
    """The command-line tokens a config file stands for; unknown keys and wrong types are a ConfigError. `own`: the
    command's options besides the train options (align's align-every and load), by key and type."""
    known, own = keys(), own or {}
    tokens: list[str] = []
    for key, value in values.items():
        if isinstance(value, dict):
            raise ConfigError(f"--config {path}: [{key}] is a table, but the file is flat: write its keys at the top, e.g. num-hidden = 800")
        if key in own:
            kind = {int: "int", str: "str"}[own[key]]
            if not _matches(kind, value):
                raise ConfigError(f"--config {path}: {key} must be {KIND_NAMES[kind]}, got {type(value).__name__} {value!r}")
            tokens += [f"--{key}", str(value)]
            continue
        option = known.get(key)
        if option is None:
            hint = f" (did you mean {key.replace('_', '-')}?)" if key.replace("_", "-") in known else ""
            raise ConfigError(f"--config {path}: unknown key '{key}'{hint}; keys are the train flags without --, e.g. num-hidden")
        kind = _kind(option)
        if not _matches(kind, value):
            raise ConfigError(f"--config {path}: {key} must be {KIND_NAMES[kind]}, got {type(value).__name__} {value!r}")
        if kind == "bool" and option.rule_dependent:  # batch-norm = false, or no-batch-norm = true
            on = value if key == option.key else not value
            tokens.append(f"--{option.key}" if on else f"--no-{option.key}")
        elif kind == "bool":
            if value:  # a switch: false is its default, which is what leaving it out means
                tokens.append(option.flag)
        elif kind == "ints":
            tokens += [option.flag, *map(str, value)]
        elif isinstance(value, list):
            tokens += [option.flag, ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)]
        else:
            tokens += [option.flag, repr(value) if isinstance(value, float) else str(value)]
    return tokens


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, str):  # json escapes every control character and DEL as TOML's basic strings need
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def dumps(values: dict[str, Any], header: str = "") -> str:
    """Flat TOML: one `key = value` line each; None values are left out (their option's default is None)."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{key} = {_value(value)}" for key, value in values.items() if value is not None]
    return "\n".join(lines) + "\n"


def write(folder: str, values: dict[str, Any]) -> str:
    """Write FOLDER/config.toml (temp file + rename: under torchrun every rank of a node writes the same file)."""
    path = os.path.join(folder, "config.toml")
    header = f"Reproduces this run: python -m pipeline train --config {path}\nKeys are the train flags without --; flags given on the command line win."
    with open(f"{path}.{os.getpid()}.tmp", "w") as f:
        f.write(dumps(values, header))
    os.replace(f"{path}.{os.getpid()}.tmp", path)
    return path
