"""Helpers shared by the tests: small, fast configs on synthetic data."""

import dataclasses

from pipeline.config import Config, DataConfig, LossConfig, ModelConfig, OptimConfig, PipelineConfig, RunConfig
from pipeline.run.in_process import run_in_process
from pipeline.training import train


def small_config(model="mlp", loss="predsim", like="mnist", stages=1, **overrides) -> Config:
    """A fast config on synthetic data; overrides are (section, field) pairs given as section__field=value."""
    sections = {
        "model": dict(name=model, num_layers=2, num_hidden=32, dropout=0.1, nonlin="leakyrelu"),
        "loss": dict(loss=loss),
        "optim": dict(lr=1e-3),
        "data": dict(dataset="synthetic", synthetic_like=like, synthetic_train_size=256, synthetic_test_size=64, batch_size=32),
        "pipeline": dict(stages=stages),
        "run": dict(epochs=1, seed=3, threads=1, progress=False),
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        sections[section][name] = value
    return Config(model=ModelConfig(**sections["model"]), loss=LossConfig(**sections["loss"]),
                  optim=OptimConfig(**sections["optim"]), data=DataConfig(**sections["data"]),
                  pipeline=PipelineConfig(**sections["pipeline"]), run=RunConfig(**sections["run"]))


def run_pipeline(cfg: Config, transport: str = "threads") -> dict:
    """Train cfg's pipeline with its stages as threads of this process ("threads": pipeline/run/in_process.py, the fast
    tier), or as stage processes over `transport` (pipeline.train); returns the run's summary."""
    if transport == "threads":
        return run_in_process(cfg)
    return train(dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, transport=transport)))


def run_ranks(target, world: int, timeout: float = 60.0, args: tuple = ()) -> list:
    """Run target(rank, world, store_port, results, *args) in `world` spawned processes; return their results by rank.

    Every process is killed if they have not all reported within `timeout` seconds (hangs fail, not block).
    """
    import queue as queue_module

    import torch.distributed as dist
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    results = context.Queue()
    processes = [context.Process(target=target, args=(rank, world, store.port, results, *args)) for rank in range(world)]
    for process in processes:
        process.start()
    collected = {}
    try:
        for _ in range(world):
            rank, value = results.get(timeout=timeout)
            collected[rank] = value
    except queue_module.Empty:
        raise TimeoutError(f"only ranks {sorted(collected)} of {world} reported within {timeout} s") from None
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    return [collected[rank] for rank in range(world)]


def init_gloo(rank: int, world: int, store_port: int) -> None:
    """Join the test's process group (gloo) through the parent's TCPStore."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", store_port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)


def malformed_messages() -> dict[str, list[bytes]]:
    """Multipart messages a zmq stage must reject: garbage, truncation, foreign versions, lies about sizes."""
    import os

    import msgpack

    def header(**fields):
        base = {"v": 1, "kind": 1, "epoch": 1, "index": 0, "tensors": [["float32", [2, 2]]], "meta": {}}
        base.update(fields)
        return msgpack.packb(base, use_bin_type=True)

    return {
        "garbage bytes": [os.urandom(64)],
        "truncated: tensor frame missing": [header()],
        "frame shorter than declared": [header(), b"\0" * 15],
        "frame longer than declared": [header(), b"\0" * 17],
        "extra frame": [header(), b"\0" * 16, b"\0" * 16],
        "wrong protocol version": [header(v=9), b"\0" * 16],
        "dtype not allowed": [header(tensors=[["complex128", [1]]]), b"\0" * 16],
        "shape and bytes mismatch": [header(tensors=[["int64", [2, 2]]]), b"\0" * 16],
        "huge declared size": [header(tensors=[["float32", [1 << 30]]]), b"\0" * 16],
        "unknown kind": [header(kind=42), b"\0" * 16],
        "pickle instead of msgpack": [b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94."],
        "empty message": [b""],
    }


class ProcessGroup:
    """A command run in a process group of its own; leaving the `with` block kills the whole group (launcher, stages,
    torchrun's workers), so a failing test never leaves a run behind."""

    def __init__(self, args: list[str], env: dict | None = None):
        import os
        import subprocess

        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    def __enter__(self):
        return self.proc

    def __exit__(self, *exc) -> None:
        import os
        import signal

        victims = _descendants(self.proc.pid)  # torchrun starts its workers in sessions of their own
        for kill, target in [(os.killpg, self.proc.pid)] + [(os.kill, pid) for pid in victims]:
            try:
                kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass  # already gone
        self.proc.communicate()


def _descendants(root: int) -> list[int]:
    """Every living process below `root`, from /proc."""
    import glob

    children: dict[int, list[int]] = {}
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            ppid = int(open(path).read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(path.split("/")[2]))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run_group(args: list[str], timeout: float, env: dict | None = None):
    """subprocess.run(args) in a process group of its own that is killed on the way out (on a timeout, too)."""
    import subprocess

    with ProcessGroup(args, env) as proc:
        stdout, stderr = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


class OutputWatch:
    """Read a running process's stdout and stderr on threads, so a test can wait for a line (a progress report, a
    checkpoint) instead of sleeping, and still read everything the process wrote once it has ended."""

    def __init__(self, proc):
        import threading

        self.proc = proc
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(getattr(proc, name), name), daemon=True)
                         for name in self.lines]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, name: str) -> None:
        for line in stream:
            with self._changed:
                self.lines[name].append(line)
                self._changed.notify_all()

    def wait_for(self, text: str, timeout: float) -> str:
        """The first line of either stream that contains `text`; fails if the process ends or `timeout` passes first."""
        import time

        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines["stderr"] + self.lines["stdout"]:
                    if text in line:
                        return line
                assert self.proc.poll() is None, f"the run ended before printing {text!r}:\n{self.stderr[-3000:]}"
                left = deadline - time.monotonic()
                assert left > 0, f"no {text!r} within {timeout} s:\n{self.stderr[-3000:]}"
                self._changed.wait(min(left, 0.2))

    def finish(self, timeout: float) -> tuple[str, str]:
        """Wait for the process to end; (stdout, stderr)."""
        self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return self.stdout, self.stderr

    @property
    def stdout(self) -> str:
        return "".join(self.lines["stdout"])

    @property
    def stderr(self) -> str:
        return "".join(self.lines["stderr"])
