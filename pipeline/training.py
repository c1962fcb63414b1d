"""The Python entry point: train a network, a factory or a --model name, sequentially or as K stage processes."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from typing import Any, Callable

from pipeline.config import Config, ConfigError
from pipeline.model.factories import check_network
from pipeline.model.network import NetworkContext
from pipeline.run.launcher import launch
from pipeline.run.resources import check_resources
from pipeline.sequential import SequentialTrainer


def factory_name(factory: Callable[[NetworkContext], Any]) -> str:
    """The --model string under which every process (spawned stages, torchrun ranks) finds `factory` again:
    package.module:function, or path/to/file.py:function for a function of the script being run."""
    module, name = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
    if not module or not name or "<" in name:
        raise ConfigError("the network factory must be a module-level function (not a lambda or a nested function), "
                          "so that every stage process can import it")
    if module == "__main__":
        path = getattr(sys.modules["__main__"], "__file__", None)
        if path is None:
            raise ConfigError("a network factory defined interactively cannot be imported by the stage processes: "
                              "put it in a file and pass path/to/file.py:function")
        return f"{os.path.abspath(path)}:{name}"
    return f"{module}:{name}"


def train(cfg: Config, network: Callable[[NetworkContext], Any] | str | None = None) -> dict[str, Any]:
    """Train `network` (a factory, a --model string, or cfg.model.name when None) as `cfg` says: in this process
    for cfg.pipeline.stages == 1, else as that many stage processes on this host. Returns the run's summary
    (summary.json's contents); raises ConfigError for a bad config or network, RuntimeError if a stage fails."""
    if network is not None:
        name = network if isinstance(network, str) else factory_name(network)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=name))
    check_resources(cfg, check_network(cfg)[2])
    if cfg.pipeline.stages == 1:
        return SequentialTrainer(cfg).run()

    with tempfile.TemporaryDirectory(prefix="pipeline-run-") as scratch:
        if cfg.run.out is None:  # the last stage writes the summary where this process can read it
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out=scratch))
        code = launch(cfg)
        if code != 0:
            raise (ConfigError if code == 2 else RuntimeError)(f"the pipeline ended with exit code {code} (its stages' errors are on stderr)")
        with open(os.path.join(cfg.run.out, "summary.json")) as f:
            return json.load(f)
