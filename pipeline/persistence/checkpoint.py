"""On disk: trained weights (each process saves its blocks), and resumable checkpoints of a whole run."""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import time

import torch

from pipeline.block.blocks import Block
from pipeline.config import ConfigError
from pipeline.model.factories import fingerprint as network_fingerprint


def save_weights(out_dir: str, blocks: list[Block], stage: int) -> str:
    """Write {block index: state dict} of a stage's blocks to out_dir/weights-stage{stage}.pt (atomically); of a
    block split over two stages, each stage writes the half it trains."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"weights-stage{stage}.pt")
    state = {block.index: {k: v.detach().cpu() for k, v in block.owned_state().items()} for block in blocks}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def load_weights(out_dir: str) -> dict[int, dict[str, torch.Tensor]]:
    """All blocks' weights saved under out_dir (on the CPU), whatever the number of stages that wrote them (the
    halves of a split block joined); a file that is damaged or not a weights file of this project is a ConfigError."""
    merged: dict[int, dict[str, torch.Tensor]] = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "weights-stage*.pt"))):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises many kinds on a damaged file
            raise ConfigError(f"cannot read {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else 'damaged'})") from None
        if not (isinstance(state, dict) and all(isinstance(k, int) and isinstance(v, dict) for k, v in state.items())
                and all(isinstance(t, torch.Tensor) for v in state.values() for t in v.values())):
            raise ConfigError(f"{path} is not a weights file of this project (block index -> state dict)")
        for index, block_state in state.items():  # a split block's halves come from two stages' files
            merged.setdefault(index, {}).update(block_state)
    return dict(sorted(merged.items()))


def flatten_state(blocks: list[Block]) -> tuple[torch.Tensor, list[list]]:
    """The floating-point state of blocks as one float32 tensor and a manifest [[block index, name, shape], ...]
    (for sending a stage's weights in one frame; integer counters such as num_batches_tracked are left out)."""
    parts, manifest = [], []
    for block in blocks:
        for name, tensor in block.owned_state().items():
            if tensor.is_floating_point():
                parts.append(tensor.detach().float().reshape(-1))
                manifest.append([block.index, name, list(tensor.shape)])
    return torch.cat(parts), manifest


def unflatten_state(flat: torch.Tensor, manifest: list[list]) -> dict[int, dict[str, torch.Tensor]]:
    """Inverse of flatten_state: {block index: partial state dict}."""
    states: dict[int, dict[str, torch.Tensor]] = {}
    offset = 0
    for index, name, shape in manifest:
        size = math.prod(shape)
        states.setdefault(index, {})[name] = flat[offset:offset + size].view(shape)
        offset += size
    if offset != flat.numel():
        raise ValueError(f"state manifest describes {offset} values, the tensor has {flat.numel()}")
    return states


# ---- resumable checkpoints ---------------------------------------------------------------------------------
#
# checkpoint_dir/step-000000123/stage-0.pt ... stage-{K-1}.pt    each written by its stage (temp file + rename)
# checkpoint_dir/step-000000123/stage-0.json ...                 each stage's manifest entry, once its file is durable
# checkpoint_dir/step-000000123/MANIFEST.json                   written last, by the last stage: the checkpoint
#                                                               is complete (and usable) only once it exists
# A position {"epoch": e, "batch": b, "step": s} means: everything before training batch b of epoch e is in.

CHECKPOINT_FORMAT = 1
MANIFEST = "MANIFEST.json"
KEEP_CHECKPOINTS = 2


def fingerprint(cfg, network: str | None = None) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint (epochs may grow, paths may move), the
    structure of its network included (a user's factory may have changed since): `network`, the fingerprint of
    the run's dry run where the caller holds it (its plan), else one made here."""

    values = cfg.to_dict()
    data = {k: v for k, v in values["data"].items() if k not in ("data_dir", "download")}
    printed = {"model": values["model"], "loss": values["loss"], "optim": values["optim"], "data": data,
               "seed": values["run"]["seed"], "stages": values["pipeline"]["stages"],
               "partition": values["pipeline"]["partition"], "dfa_max_delay": values["pipeline"]["dfa_max_delay"],
               "precision": values["run"]["precision"],
               "network": network if network is not None else network_fingerprint(cfg)}
    if values["pipeline"]["heads_max_delay"]:  # only when set: checkpoints from before the option still match
        printed["heads_max_delay"] = values["pipeline"]["heads_max_delay"]
    return printed


def stage_state(blocks: list[Block], rank: int, world: int, position: dict, print_: dict) -> dict:
    """Everything a stage needs to continue exactly: weights and buffers, optimizer and generator states, the
    epoch's running statistics, and where in the data it stopped."""
    state = {"format": CHECKPOINT_FORMAT, "stage": rank, "stages": world, "position": dict(position),
             "fingerprint": json.dumps(print_, sort_keys=True), "device": _device_type(blocks), "blocks": {}}
    for block in blocks:
        stats = block.stats
        state["blocks"][block.index] = {
            "model": block.state_dict(),
            "optimizer": block.optimizer.state_dict(),
            "generator": block.generator.get_state(),
            "host_generator": block.host_generator.get_state() if block.host_generator is not None else None,
            "part": block.part,  # whole, or the half of a split block this stage trains
            "stats": {"loss_sum": torch.as_tensor(stats.loss_sum), "hits": torch.as_tensor(stats.hits),
                      "examples": stats.examples, "scored": stats.scored},
            "skipped": block.skipped,
            "scaler": block.scaler.state_dict() if getattr(block, "scaler", None) is not None else None,  # fp16
        }
    return state


def _device_type(blocks: list[Block]) -> str:
    """cpu or cuda: where these blocks' generators draw (their states cannot move to the other kind)."""
    return blocks[0].generator.device.type


def _wrong_device(where: str, written: str, here: str) -> ConfigError:
    return ConfigError(f"--resume: {where} was written on {written}, this run is on {here}: resume with --device {written}")


def restore_stage(blocks: list[Block], state: dict) -> None:
    """Put a stage's saved state (load_stage_checkpoint) back into its blocks. A state from the other device type is
    refused: a CPU generator's state (5056 bytes) and a CUDA one's (16) cannot stand in for each other, and
    checkpoints without a "device" field are told apart by that size."""
    here, where = _device_type(blocks), state.get("path", "the checkpoint")
    if state.get("device", here) != here:
        raise _wrong_device(where, state["device"], here)
    for block in blocks:
        saved = state["blocks"].get(block.index)
        if saved is None or saved.get("part", "whole") != block.part:
            held = "does not hold it" if saved is None else f"holds its {saved.get('part', 'whole')}"
            raise ConfigError(f"--resume: this run places block {block.index}'s {block.part} on stage "
                              f"{state.get('stage')}, but {where} {held}: resume with the partition it was written with")
        if saved["generator"].numel() != block.generator.get_state().numel():
            raise _wrong_device(where, "cuda" if here == "cpu" else "cpu", here)
        block.load_state_dict(saved["model"])
        block.optimizer.load_state_dict(saved["optimizer"])
        block.generator.set_state(saved["generator"].to("cpu"))
        if block.host_generator is not None and saved.get("host_generator") is not None:
            block.host_generator.set_state(saved["host_generator"])
        stats = saved["stats"]
        device = next(block.parameters()).device
        block.stats.loss_sum = stats["loss_sum"].to(device)
        block.stats.hits = stats["hits"].to(device)
        block.stats.examples, block.stats.scored = stats["examples"], stats["scored"]
        block.skipped = saved["skipped"]
        if getattr(block, "scaler", None) is not None and saved.get("scaler"):
            block.scaler.load_state_dict(saved["scaler"])


def _folder(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:09d}")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_folder(folder: str) -> None:
    """Make the folder's entries (a file renamed into it, a new subfolder) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable_replace(tmp: str, path: str) -> None:
    """Rename a written file into place durably: its bytes reach the disk first (fsync), then the rename (an fsync of
    its folder), so that after a crash the name never points at bytes that were lost. (POSIX leaves the order in
    which a file's data and a rename reach the disk to the file system; fsync is the only promise.)"""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_folder(os.path.dirname(path))


def _retire_manifest(folder: str, position: dict) -> None:
    """A folder's manifest of another position (the last batch's checkpoint, then the end of the run's, share a
    step) goes, durably, before any file in it is replaced: until the new manifest, the folder is incomplete and
    the checkpoint before it counts, never a manifest whose files have changed."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            if json.load(f).get("position") == position:
                return
        os.remove(path)
    except (OSError, ValueError):  # none, or another stage removed it first
        return
    _fsync_folder(folder)


def save_stage_checkpoint(root: str, state: dict) -> dict:
    """Write one stage's state into the checkpoint folder of its step, durably; returns its manifest entry."""
    folder = _folder(root, state["position"]["step"])
    if not os.path.isdir(folder):
        os.makedirs(folder, exist_ok=True)
        _fsync_folder(root)
    path = os.path.join(folder, f"stage-{state['stage']}.pt")
    _retire_manifest(folder, state["position"])
    torch.save(state, path + ".tmp")
    _durable_replace(path + ".tmp", path)
    return {"stage": state["stage"], "file": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": _sha256(path),
            "device": state["device"]}


def write_entry(root: str, position: dict, entry: dict) -> None:
    """A stage's manifest entry beside its file (stage-K.json), durably: the last stage reads them all."""
    path = os.path.join(_folder(root, position["step"]), f"stage-{entry['stage']}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(entry, f)
    _durable_replace(path + ".tmp", path)


def _entry(path: str, position: dict, token: str) -> dict | None:
    try:
        with open(path) as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return None
    return entry if entry.get("position") == position and entry.get("token") == token else None


def read_entries(root: str, position: dict, world: int, patience_s: float, token: str = "") -> list[dict]:
    """Every stage's entry for the checkpoint at `position` written by this run attempt (`token`), once all are there
    (polled: on shared storage they come from other hosts; an entry left by another attempt, or by an earlier
    checkpoint of the same step, waits to be replaced); a TimeoutError after patience_s (a stage that died leaves
    the checkpoint incomplete)."""
    folder, deadline = _folder(root, position["step"]), time.monotonic() + patience_s
    entries: list[dict | None] = [None] * world
    while True:
        entries = [entry or _entry(os.path.join(folder, f"stage-{rank}.json"), position, token)
                   for rank, entry in enumerate(entries)]
        if all(entries):
            return entries
        if time.monotonic() > deadline:
            missing = [rank for rank, entry in enumerate(entries) if entry is None]
            raise TimeoutError(f"checkpoint {folder}: no entry from stage(s) {missing} within {patience_s:.0f} s")
        time.sleep(0.02)


def finish_checkpoint(root: str, position: dict, world: int, files: list[dict], print_: dict) -> str:
    """Mark a checkpoint complete with its manifest (atomically and durably, after every stage's file is durable: each
    stage made its own so before it reported its entry), then drop all but the newest few."""
    folder = _folder(root, position["step"])
    devices = {entry.get("device") for entry in files}  # one kind: every stage has the run's --device
    manifest = {"format": CHECKPOINT_FORMAT, "position": position, "stages": world, "files": files, "fingerprint": print_,
                "device": devices.pop() if len(devices) == 1 else None}
    path = os.path.join(folder, MANIFEST)
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    _durable_replace(path + ".tmp", path)
    complete = sorted(glob.glob(os.path.join(root, "step-*", MANIFEST)))  # older ones go once this one is durable
    for old in complete[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(os.path.dirname(old), ignore_errors=True)
    return folder


def latest_checkpoint(root: str) -> tuple[str, dict]:
    """The newest complete checkpoint under root: (folder, manifest). Partial ones (no manifest) are ignored."""
    for path in sorted(glob.glob(os.path.join(root, "step-*", MANIFEST)), reverse=True):
        try:
            with open(path) as f:
                return os.path.dirname(path), json.load(f)
        except (OSError, ValueError):
            continue
    raise ConfigError(f"--resume: no complete checkpoint under '{root}' (a checkpoint counts once its {MANIFEST} is written)")


def verify_checkpoint(root: str, cfg, network: str | None = None) -> tuple[str, dict]:
    """The checkpoint a run resumes from, refused with a clear ConfigError if it is not this run's or is damaged
    (`network`: the run's network fingerprint, as for `fingerprint`)."""
    folder, manifest = latest_checkpoint(root)
    if manifest.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"--resume: {folder} has checkpoint format {manifest.get('format')}, this version reads {CHECKPOINT_FORMAT}")
    if manifest["stages"] != cfg.pipeline.stages:
        raise ConfigError(f"--resume: {folder} was written by {manifest['stages']} stages, this run has "
                          f"{cfg.pipeline.stages}: use --stages {manifest['stages']}")
    if manifest.get("device") not in (None, cfg.run.device):  # None: written before the field existed
        raise _wrong_device(folder, manifest["device"], cfg.run.device)
    mine = fingerprint(cfg, network)
    differs = [key for key in mine if json.dumps(mine[key], sort_keys=True) != json.dumps(manifest["fingerprint"].get(key), sort_keys=True)]
    if "model" in differs and "network" in differs:
        differs.remove("network")  # its structure differs because its options do: name the cause only
    if differs:
        raise ConfigError(f"--resume: {folder} was written by another run ({', '.join(differs)} differ): resume with the same settings")
    if manifest["position"]["epoch"] > cfg.run.epochs:
        raise ConfigError(f"--resume: {folder} is already past epoch {cfg.run.epochs}: raise --epochs")
    for entry in manifest["files"]:
        path = os.path.join(folder, entry["file"])
        if not os.path.isfile(path) or os.path.getsize(path) != entry["bytes"] or _sha256(path) != entry["sha256"]:
            raise ConfigError(f"--resume: {path} is missing or damaged (its size or checksum differs from the manifest)")
    return folder, manifest


def load_stage_checkpoint(folder: str, rank: int) -> dict:
    """One stage's state, loaded safely (tensors and plain containers only: weights_only=True)."""
    path = os.path.join(folder, f"stage-{rank}.pt")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise ConfigError(f"--resume: cannot read {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if state.get("format") != CHECKPOINT_FORMAT or state.get("stage") != rank:
        raise ConfigError(f"--resume: {path} is not stage {rank}'s checkpoint")
    state["path"] = path  # for restore_stage's messages
    return state
