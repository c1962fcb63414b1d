"""The `align` command: train (or load) a network and report each hidden layer's angle to the backprop gradient."""

from __future__ import annotations

import itertools
import json
import os

from pipeline.observe.alignment import AlignmentLog, write_alignment_report
from pipeline.persistence.checkpoint import load_weights
from pipeline.config import Config, ConfigError
from pipeline.data import BatchSource
from pipeline.model.factories import build_blocks
from pipeline.sequential import SequentialTrainer


def load_trained(run_dir: str, device: str) -> tuple[Config, list]:
    """The config and trained blocks of a finished run (its summary.json and weights-stage*.pt)."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            values = json.load(f)["config"]
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"--load {run_dir}: no readable summary.json of a finished run ({exc})") from None
    values["run"].update(device=device, out=None)
    cfg = Config.from_dict(values)
    weights = load_weights(run_dir)
    source_shape = BatchSource.shape_of(cfg.data)
    blocks = build_blocks(cfg, *source_shape, device=device)
    if sorted(weights) != [b.index for b in blocks]:
        raise ConfigError(f"--load {run_dir}: weights for blocks {sorted(weights)}, the config has {len(blocks)} blocks")
    for block in blocks:
        block.load_state_dict(weights[block.index])
    return cfg, blocks


def table(records: list[dict]) -> str:
    """Markdown table: one row per hidden layer, one column per epoch-end (or single) measurement."""
    shown = [r for r in records if r["epoch_end"]] or records[-1:]
    head = "| layer | " + " | ".join(f"epoch {r['epoch']}" if r["epoch_end"] else f"step {r['step']}" for r in shown) + " |"
    rule = "|---|" + "---|" * len(shown)
    rows = [f"| {layer} | " + " | ".join(f"{r['angles'][i]:.1f}" for r in shown) + " |" for i, layer in enumerate(shown[0]["layers"])]
    return "\n".join([head, rule, *rows])


def run_align(cfg: Config, every: int, load: str | None) -> list[dict]:
    """Measure alignment while training with cfg (every `every` steps and at each epoch end), or once on a
    loaded run; writes alignment.json/.csv/.png under cfg.run.out and prints the table."""
    if not cfg.run.out:
        raise ConfigError("align writes its table and plot to --out DIR: give one")
    if load:
        loaded_cfg, blocks = load_trained(load, cfg.run.device)
        source = BatchSource(loaded_cfg.data, loaded_cfg.run.seed, cfg.run.device)
        heldout = [(b.x, b.y) for b in itertools.islice(source.eval_batches(), cfg.run.alignment_batches)]
        log = AlignmentLog(heldout, loaded_cfg.loss.loss, cfg.run.out)
        log.measure(blocks, step=0, epoch=loaded_cfg.run.epochs, epoch_end=True)
    else:
        cfg.run.log_alignment = every
        trainer = SequentialTrainer(cfg)
        trainer.run()
        log = trainer.alignment
    paths = write_alignment_report(log.records, cfg.run.out)
    print(f"angle to the backprop gradient (degrees; 90 = random), rule {log.rule}:")
    print(table(log.records))
    print(f"wrote {', '.join(paths.values())}")
    return log.records
