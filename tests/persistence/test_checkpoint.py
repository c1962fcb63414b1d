"""Checkpoints: an interrupted run resumes bit-identical; damaged, partial or foreign checkpoints are refused."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ProcessGroup, run_group, small_config
from pipeline.persistence.checkpoint import MANIFEST, _sha256, load_stage_checkpoint, load_weights, verify_checkpoint
from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.run.in_process import run_in_process
from pipeline.run.faults import STOP_ENV, Hooks
from pipeline.run.restarts import EXIT_STOPPED, PROGRESS
from pipeline.sequential import SequentialTrainer

ARGS = ["--dataset", "synthetic", "--num-layers", "2", "--num-hidden", "128", "--batch-size", "32", "--dropout", "0.1",
        "--synthetic-train-size", "6400", "--synthetic-test-size", "200", "--epochs", "2", "--threads", "1", "--no-progress",
        "--lr", "1e-3", "--seed", "3", "--nonlin", "leakyrelu"]  # = _config()


def _config(**kw):
    settings = dict(model__num_layers=2, model__num_hidden=128, data__synthetic_train_size=6400,
                    data__synthetic_test_size=200, run__epochs=2)
    return small_config(**{**settings, **kw})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    SequentialTrainer(_config(run__out=str(out))).run()
    return load_weights(str(out)), (out / "metrics.jsonl").read_text().splitlines()


def _same_weights(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])


STOP = "2:150"  # PIPELINE_STOP_AT: as if a signal came just before epoch 2's batch 150 (of 200): step 350
BEFORE_STOP = "2:149"  # a resumed run that trained any batch before the checkpoint's would pass here and stop


def _dfa(args):
    return args + ["--loss", "dfa", "--nonlin", "tanh", "--dfa-sync"]


@pytest.fixture(scope="module")
def uninterrupted_dfa(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted-dfa")
    assert main(["train", *_dfa(ARGS), "--out", str(out)]) == 0
    return load_weights(str(out)), (out / "metrics.jsonl").read_text().splitlines()


def _strip(lines):
    return [{k: v for k, v in json.loads(l).items() if k not in ("wall_s", "train_samples_per_s")} for l in lines]


# the command line, in stage processes: once per transport (and torchrun), and the sequential trainer; the
# placements and rules run as threads below
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stages,transport,torchrun,every,dfa,extra", [
    (1, None, False, "20", False, []), (2, "dist", False, "20", False, ["--partition", "1.5,1.5"]),
    (3, "zmq", True, "20", False, []), (2, "local", False, "1e", False, []), (1, None, False, "1e", True, [])],
    ids=["sequential", "dist-split-heads", "zmq-torchrun", "local-epochs", "sequential-dfa"])
def test_a_run_stopped_at_a_batch_resumes_there_and_ends_bit_identical(uninterrupted, uninterrupted_dfa, tmp_path,
                                                                        stages, transport, torchrun, every, dfa, extra):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    launcher = [sys.executable, "-m", "pipeline", "train"]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(stages),
                    "-m", "pipeline", "train"]
    args = launcher + [*ARGS, "--checkpoint-dir", str(ckpt), "--checkpoint-every", every, "--out", str(out)]
    if stages > 1:
        args += ["--stages", str(stages), "--transport", transport, *extra]
    if dfa:
        args = _dfa(args)
    stopped = run_group(args, timeout=180, env={STOP_ENV: STOP})
    # stopped early, checkpointed: EXIT_STOPPED (torchrun's agent reports its workers' code as a failure)
    assert stopped.returncode == EXIT_STOPPED or (torchrun and "exitcode  : 75" in stopped.stderr), stopped.stderr
    assert "stopped at epoch 2 batch 150" in stopped.stdout + stopped.stderr, stopped.stdout + stopped.stderr
    assert json.loads((out / "summary.json").read_text())["stopped_at"] == {"epoch": 2, "batch": 150, "step": 350}
    # only complete checkpoints count and the newest two are kept: every 20 batches -> steps 340 and 350 (the
    # stop); every epoch -> the end of epoch 1 (step 200) and the stop
    kept = sorted(p.parent.name for p in ckpt.glob(f"step-*/{MANIFEST}"))
    assert kept == (["step-000000340", "step-000000350"] if every == "20" else ["step-000000200", "step-000000350"])
    assert sorted(p.name for p in ckpt.iterdir() if p.name != PROGRESS) == kept  # progress: see pipeline/run/restarts.py
    newest = json.loads((ckpt / kept[-1] / MANIFEST).read_text())
    assert newest["position"] == {"epoch": 2, "batch": 150, "step": 350}

    # the resumed run starts at batch 150: told to stop just before it, it never gets there
    resumed = run_group(args + ["--resume"], timeout=180, env={STOP_ENV: BEFORE_STOP})
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["stopped_at"] is None, "the resumed run trained batch 149 again"
    weights, metrics = uninterrupted_dfa if dfa else uninterrupted
    assert _same_weights(load_weights(str(out)), weights)
    assert _strip((out / "metrics.jsonl").read_text().splitlines()) == _strip(metrics)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stages,partition,dfa", [
    (2, None, False), (3, None, False), (2, None, True), (3, None, True),
    (2, (1.5, 1.5), False),  # block 1's layer on stage 0, its heads on 1
    (2, ("1.5h", 1.5), False),  # block 1's heads on stage 0, its layer on 1
    (3, "auto", False)],  # the resumed run takes the placement from the checkpoint's manifest, not a new profile
    ids=["2", "3", "2-dfa", "3-dfa", "split-heads", "heads-first", "3-auto"])
def test_stages_as_threads_stopped_at_a_batch_resume_there_bit_identical(uninterrupted, uninterrupted_dfa, tmp_path,
                                                                         stages, partition, dfa):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    kw = dict(pipeline__stages=stages, pipeline__partition=partition, run__checkpoint_dir=str(ckpt),
              run__checkpoint_every=20, run__out=str(out))
    if dfa:
        kw.update(loss="dfa", model__nonlin="tanh", model__batch_norm=False, data__augment=False,  # = _dfa(ARGS):
                  optim__lr_decay_milestones=(4, 7), optim__lr_decay_fact=0.3, pipeline__dfa_sync=True)  # its defaults
    stopped = run_in_process(_config(**kw), Hooks(stop_at=(2, 150)))  # = STOP
    assert stopped["stopped_at"] == {"epoch": 2, "batch": 150, "step": 350}
    newest = json.loads((ckpt / "step-000000350" / MANIFEST).read_text())
    sizes = [entry["size"] for entry in sorted(newest["files"], key=lambda e: e["stage"])]
    assert sizes == stopped["partition"] and len(sizes) == stages
    # the resumed run starts at batch 150: told to stop just before 149 (BEFORE_STOP), it never gets there
    resumed = run_in_process(_config(**kw, run__resume=True), Hooks(stop_at=(2, 149)))
    assert resumed["stopped_at"] is None and resumed["partition"] == sizes
    if partition == "auto":  # stage 0 read the placement from the manifest's sizes
        assert resumed["stage_stats"][0]["partition_profile"] == {"resumed_placement": sizes}
    weights, metrics = uninterrupted_dfa if dfa else uninterrupted
    assert _same_weights(load_weights(str(out)), weights)
    assert _strip((out / "metrics.jsonl").read_text().splitlines()) == _strip(metrics)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("torchrun", [False, True], ids=["local", "torchrun"])
def test_a_preemption_signal_checkpoints_and_the_same_command_continues(uninterrupted, tmp_path, torchrun):
    """SIGUSR1, a batch system's warning before it preempts a job: a checkpoint at the next batch, exit EXIT_STOPPED,
    and the same command (it has --auto-resume) continues to the end, bit-identical."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    launcher = [sys.executable, "-m", "pipeline", "train", "--stages", "3"]
    if torchrun:  # its agent passes the signal on to every stage when told to handle it (launch/slurm.sbatch)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                    "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "-m", "pipeline", "train"]
    args = launcher + [*ARGS, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "20", "--out", str(out),
                       "--transport", "zmq", "--auto-resume"]
    with ProcessGroup(args) as proc:
        deadline = time.monotonic() + 120
        while not list(ckpt.glob(f"step-*/{MANIFEST}")):  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_STOPPED or torchrun, stderr  # torchrun's agent reports the signal as a failure
    assert "stopped at epoch" in stdout + stderr, stdout + stderr
    stopped_at = json.loads((out / "summary.json").read_text())["stopped_at"]
    assert stopped_at is not None
    newest = max(ckpt.glob(f"step-*/{MANIFEST}"))
    assert json.loads(newest.read_text())["position"] == stopped_at  # the stop was checkpointed
    resumed = run_group(args, timeout=180)  # the same command
    assert resumed.returncode == 0, resumed.stderr
    assert f"--auto-resume: resuming from {newest.parent}" in resumed.stderr
    weights, metrics = uninterrupted
    assert _same_weights(load_weights(str(out)), weights)
    assert _strip((out / "metrics.jsonl").read_text().splitlines()) == _strip(metrics)


@pytest.fixture
def checkpointed(tmp_path):
    cfg = _config(run__checkpoint_dir=str(tmp_path / "ckpt"), run__epochs=1)
    SequentialTrainer(cfg).run()
    folder = next((tmp_path / "ckpt").glob("step-*"))
    return cfg, folder


def _resume_config(cfg, **kw):
    return _config(run__checkpoint_dir=cfg.run.checkpoint_dir, run__resume=True, run__epochs=2, **kw)


def test_a_damaged_checkpoint_is_refused(checkpointed):
    cfg, folder = checkpointed
    path = folder / "stage-0.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="missing or damaged"):
        verify_checkpoint(cfg.run.checkpoint_dir, _resume_config(cfg))


def test_a_partial_checkpoint_is_not_used(checkpointed):
    cfg, folder = checkpointed
    (folder / MANIFEST).unlink()  # as if a stage died before the checkpoint was complete
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        verify_checkpoint(cfg.run.checkpoint_dir, _resume_config(cfg))


def test_a_checkpoint_of_another_model_or_stage_count_is_refused(checkpointed):
    cfg, _ = checkpointed
    with pytest.raises(ConfigError, match="model differ"):
        verify_checkpoint(cfg.run.checkpoint_dir, _resume_config(cfg, model__num_hidden=64))
    with pytest.raises(ConfigError, match="written by 1 stages, this run has 2: use --stages 1"):
        verify_checkpoint(cfg.run.checkpoint_dir, _resume_config(cfg, pipeline__stages=2))


def test_code_hidden_in_a_checkpoint_is_never_run(checkpointed, tmp_path):
    cfg, folder = checkpointed
    path = folder / "stage-0.pt"
    marker = tmp_path / "pwned"
    torch.save({"format": 1, "stage": 0, "payload": _Exploit(str(marker))}, path)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][0].update(bytes=os.path.getsize(path), sha256=_sha256(str(path)))  # a consistent, hostile file
    (folder / MANIFEST).write_text(json.dumps(manifest))
    verify_checkpoint(cfg.run.checkpoint_dir, _resume_config(cfg))
    with pytest.raises(ConfigError, match="cannot read"):
        load_stage_checkpoint(str(folder), 0)
    assert not marker.exists()


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_problems_exit_2_with_one_line(checkpointed, capsys):
    cfg, _ = checkpointed
    base = ARGS + ["--checkpoint-dir", cfg.run.checkpoint_dir, "--resume"]
    assert main(["train", *base, "--num-hidden", "64"]) == 2
    assert main(["train", *base, "--epochs", "0"]) == 2
    assert main(["train", "--dataset", "synthetic", "--resume"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and "another run (model differ)" in lines[0] and "--resume, --auto-resume and --checkpoint-every need --checkpoint-dir" in lines[2]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("recorded", [True, False], ids=["device recorded", "older checkpoint: generator size"])
def test_a_checkpoint_from_another_device_type_exits_2_with_one_line(checkpointed, recorded):
    cfg, folder = checkpointed
    path = folder / "stage-0.pt"
    state = torch.load(path, weights_only=True)
    manifest = json.loads((folder / MANIFEST).read_text())
    if recorded:  # as written by a run on a GPU
        manifest["device"] = manifest["files"][0]["device"] = state["device"] = "cuda"
        where = folder
    else:  # written before the device was recorded: only the generator states (a CUDA one has 16 bytes) tell
        for record in (manifest, manifest["files"][0], state):
            record.pop("device", None)
        for block in state["blocks"].values():
            block["generator"] = torch.zeros(16, dtype=torch.uint8)
        where = path
    torch.save(state, path)
    manifest["files"][0].update(bytes=os.path.getsize(path), sha256=_sha256(str(path)))
    (folder / MANIFEST).write_text(json.dumps(manifest))
    resumed = subprocess.run([sys.executable, "-m", "pipeline", "train", *ARGS, "--checkpoint-dir", cfg.run.checkpoint_dir,
                              "--resume"], capture_output=True, text=True, timeout=100)
    assert resumed.returncode == 2, resumed.stderr
    assert resumed.stderr.splitlines() == [f"error: --resume: {where} was written on cuda, this run is on cpu: resume with --device cuda"]


def test_a_block_placed_otherwise_than_in_the_checkpoint_is_refused():
    """A stage restores only the half of a split block it saved: a whole block is not rebuilt from a layer's half."""
    from pipeline.persistence.checkpoint import restore_stage, stage_state
    from pipeline.config import ConfigError
    from pipeline.model.factories import build_blocks

    cfg = _config()
    blocks = build_blocks(cfg, (1, 28, 28), 10, indices=[0, 1])
    blocks[1].part = "layer"
    state = stage_state(blocks, 0, 2, {"epoch": 1, "batch": 3, "step": 3}, {})
    restore_stage(blocks, state)  # the same placement: fine
    blocks[1].part = "whole"
    with pytest.raises(ConfigError, match=r"places block 1's whole on stage 0, but the checkpoint holds its layer"):
        restore_stage(blocks, state)
    with pytest.raises(ConfigError, match=r"places block 2's whole on stage 0, but the checkpoint does not hold it"):
        restore_stage(build_blocks(cfg, (1, 28, 28), 10, indices=[2]), state)


def test_a_checkpoint_is_durable_before_its_manifest_names_it_and_before_older_ones_go(tmp_path, monkeypatch):
    """Every stage file's bytes, then its rename (its folder), are on disk before the manifest is written; the
    manifest's own bytes and rename too before an older checkpoint is deleted."""
    import shutil

    from pipeline.persistence import checkpoint

    events = []
    fsync, replace, rmtree = os.fsync, os.replace, shutil.rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or replace(a, b))
    monkeypatch.setattr(shutil, "rmtree", lambda path, **kw: events.append(("rmtree", str(path))) or rmtree(path, **kw))
    root = str(tmp_path)
    for step in (1, 2, 3):  # the third makes the first go (the newest two are kept)
        events.clear()
        position = {"epoch": 1, "batch": step, "step": step}
        files = [checkpoint.save_stage_checkpoint(root, {"stage": k, "position": position, "device": "cpu"}) for k in (0, 1)]
        checkpoint.finish_checkpoint(root, position, 2, files, {})
    folder = os.path.join(root, "step-000000003")
    stage0, stage1, manifest = (os.path.join(folder, name) for name in ("stage-0.pt", "stage-1.pt", MANIFEST))
    assert events == [("fsync", root),  # the new step folder's entry
                    ("fsync", stage0 + ".tmp"), ("replace", stage0), ("fsync", folder),
                    ("fsync", stage1 + ".tmp"), ("replace", stage1), ("fsync", folder),
                    ("fsync", manifest + ".tmp"), ("replace", manifest), ("fsync", folder),
                    ("rmtree", os.path.join(root, "step-000000001"))]
