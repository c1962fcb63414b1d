"""The checkpoint writer: the compute thread stops only for a snapshot; a checkpoint is complete only once every
stage's file and entry are durable."""

import os
import shutil
import threading
import time

import torch

from pipeline import checkpoint, checkpoint_writer
from pipeline.checkpoint import MANIFEST
from pipeline.checkpoint_writer import CheckpointWriter, host_copy


def _state(rank, step):
    return {"stage": rank, "position": {"epoch": 1, "batch": step, "step": step}, "device": "cpu",
            "blocks": {rank: {"model": {"w": torch.full((4,), float(step))}}}}


def test_the_manifest_comes_after_every_stage_file_and_entry_is_durable_and_before_older_ones_go(tmp_path, monkeypatch):
    events, lock = [], threading.Lock()
    fsync, replace, rmtree = os.fsync, os.replace, shutil.rmtree

    def record(event):
        with lock:
            events.append(event)

    monkeypatch.setattr(os, "fsync", lambda fd: record(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: record(("replace", str(b))) or replace(a, b))
    monkeypatch.setattr(shutil, "rmtree", lambda path, **kw: record(("rmtree", str(path))) or rmtree(path, **kw))
    root = str(tmp_path)
    writers = [CheckpointWriter(root, rank, 2, patience_s=10) for rank in (1, 0)]  # the last stage's first: it waits
    for step in (1, 2, 3):  # the third makes the first go (the newest two are kept)
        events.clear()
        for writer in writers:
            writer.submit(_state(writer.rank, step), 1, {})
        for writer in writers:
            writer.wait()
    folder = os.path.join(root, "step-000000003")
    manifest = events.index(("replace", os.path.join(folder, MANIFEST)))
    for rank in (0, 1):
        for name in (f"stage-{rank}.pt", f"stage-{rank}.json"):
            path = os.path.join(folder, name)
            durable = events.index(("fsync", path + ".tmp")) < events.index(("replace", path)) < manifest
            folder_synced = ("fsync", folder) in events[events.index(("replace", path)):manifest]
            assert durable and folder_synced, (name, events)
    assert events[manifest - 1] == ("fsync", os.path.join(folder, MANIFEST) + ".tmp")
    assert events[manifest + 1:] == [("fsync", folder), ("rmtree", os.path.join(root, "step-000000001"))]
    entries = {entry["stage"]: entry for entry in checkpoint.latest_checkpoint(root)[1]["files"]}
    assert sorted(entries) == [0, 1] and all(entry["size"] == 1 for entry in entries.values())


def test_the_compute_thread_does_not_wait_for_the_write(tmp_path, monkeypatch):
    save = checkpoint_writer.save_stage_checkpoint

    def slow_save(root, state):
        time.sleep(1.0)  # a slow disk
        return save(root, state)

    monkeypatch.setattr(checkpoint_writer, "save_stage_checkpoint", slow_save)
    writer = CheckpointWriter(str(tmp_path), 0, 1, patience_s=10)
    started = time.perf_counter()
    writer.submit(_state(0, 1), 1, {})
    assert time.perf_counter() - started < 0.5  # on the old code the stage wrote its file before it went on
    writer.wait()
    assert checkpoint.latest_checkpoint(str(tmp_path))[1]["position"]["step"] == 1
    assert len(writer.write_s) == 1 and writer.write_s[0] >= 1.0


def test_the_snapshot_is_not_changed_by_training_after_it():
    weight = torch.zeros(3)
    state = {"blocks": {0: {"model": {"w": weight}, "optimizer": {"state": [torch.ones(2)]}}}, "position": {"step": 1}}
    snapshot = host_copy(state)
    weight += 1
    assert torch.equal(snapshot["blocks"][0]["model"]["w"], torch.zeros(3)) and snapshot["position"] == {"step": 1}


def test_a_failed_write_is_raised_on_the_compute_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_writer, "save_stage_checkpoint", lambda root, state: 1 / 0)
    writer = CheckpointWriter(str(tmp_path), 0, 1, patience_s=10)
    writer.submit(_state(0, 1), 1, {})
    try:
        writer.wait()
    except ZeroDivisionError:
        return
    raise AssertionError("the writer's failure was lost")
