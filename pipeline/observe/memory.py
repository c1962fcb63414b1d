"""Memory accounting of one process (a stage, or the sequential trainer): the bytes autograd saves for backward,
counted by storage, the parameters, gradients and optimizer state, and the messages in flight.

[Note: memory accounting] RSS and the CUDA allocator's peak say how much a process holds, not why: the torch
runtime alone is about 700 MiB of RSS. What local learning changes is what autograd keeps for backward, so that
is counted where autograd keeps it: every training step runs under torch.autograd.graph.saved_tensors_hooks
(https://pytorch.org/docs/stable/autograd.html#saved-tensors-hooks), whose pack hook sees each tensor a graph
saves. A storage counts once however many saved tensors view it, from the first save until the last one is
released (backward frees a graph's saved tensors, or the graph is dropped), so the peak is the largest number of
bytes that graphs held at once; each save is tagged with what made it, the block's layer or its heads. The hook
keeps a detached alias, not the tensor: a saved output that referred to its own grad_fn would form a reference
cycle that only the garbage collector breaks (and the count would wait for it). A pack hook that returns
something else than the tensor turns off autograd's check that a saved tensor was not modified in place, so the
unpack hook makes the same check on the version counter, which the alias shares. Messages are counted the same
way, by storage, from arrival (or creation) until their buffers are released. Saved tensors and messages are
also counted together (`live`), where a storage that is both (a stage's input, which its first layer saves) counts
once: the accounted peak adds that joint peak to the parameters', gradients' and optimizer state's peaks.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Iterable, Iterator

import torch
from torch import nn

if TYPE_CHECKING:
    from pipeline.block.blocks import Block


class LiveBytes:
    """Bytes of the storages currently held, each counted once, and the peak of that sum (thread-safe)."""

    def __init__(self, union: LiveBytes | None = None) -> None:
        """`union`: a count this one's storages also go into, shared with others (a storage held by two counts
        once there)."""
        # one lock for a union and the counts that feed it: a child's lock, then the union's, never the reverse
        # order across threads (a garbage-collected _Saved drops its count inside whatever lock is held)
        self.lock = union.lock if union is not None else threading.RLock()
        self.held: dict[tuple, list] = {}  # storage key -> [references, bytes, tag]
        self.total = self.peak = 0
        self.by_tag: dict[str, int] = {}
        self.peak_by_tag: dict[str, int] = {}
        self.union = union

    @staticmethod
    def key(tensor: torch.Tensor) -> tuple | None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or other storage-less tensors: not counted
            return None
        return (tensor.device.type, tensor.device.index, storage.data_ptr(), storage.nbytes())

    def hold(self, tensor: torch.Tensor, tag: str = "") -> tuple | None:
        key = self.key(tensor)
        if key is None:
            return None
        with self.lock:
            entry = self.held.get(key)
            if entry is not None:
                entry[0] += 1
                return key
            self.held[key] = [1, key[3], tag]
            if self.union is not None:
                self.union.hold(tensor, tag)
            self.total += key[3]
            self.by_tag[tag] = self.by_tag.get(tag, 0) + key[3]
            if self.total > self.peak:
                self.peak, self.peak_by_tag = self.total, dict(self.by_tag)
        return key

    def drop(self, key: tuple | None) -> None:
        if key is None:
            return
        with self.lock:
            entry = self.held[key]
            entry[0] -= 1
            if entry[0] == 0:
                del self.held[key]
                self.total -= entry[1]
                self.by_tag[entry[2]] -= entry[1]
                if self.union is not None:
                    self.union.drop(key)


class _Saved:
    """What a graph keeps in place of a saved tensor: a detached alias, its version at save time, its count's key."""

    __slots__ = ("tensor", "version", "key", "live")

    def __init__(self, tensor: torch.Tensor, live: LiveBytes, tag: str, held_anyway: set):
        self.tensor, self.version, self.live = tensor.detach(), tensor._version, live
        # a parameter or buffer saved by its layer (or a view of one, such as a transposed weight) is held anyway
        # and counted with the parameters, not as saved for backward
        key = live.key(tensor)
        self.key = live.hold(tensor, tag) if key is not None and key not in held_anyway else None

    def __del__(self) -> None:
        self.live.drop(self.key)


class MemoryMeter:
    """One process's accounting: saved tensors, gradients, optimizer state and messages (see the module's Note)."""

    def __init__(self) -> None:
        # saved tensors and messages, each on its own, and both together: a message that a graph saves (a stage's
        # input, kept by its first layer; an output that is also h, kept by the heads) is one storage, counted once
        self.live = LiveBytes()
        self.saved = LiveBytes(self.live)
        self.messages = LiveBytes(self.live)
        self.blocks: list[Block] = []
        self._parameters: list[torch.Tensor] = []
        self.model_storages: set[tuple] = set()  # the blocks' parameters and buffers
        self.gradient_peak = 0
        self._part = threading.local()

    def __deepcopy__(self, memo: dict) -> MemoryMeter:
        return self  # one accountant per process: a copied block (an alignment twin) reports to the same one

    def attach(self, blocks: list[nn.Module]) -> MemoryMeter:
        """Account for these blocks (a process's own, or a baseline's stage modules): their parameters, buffers,
        gradients and optimizer state (`.optimizer`, where they have one); their blocks report their steps here."""
        self.blocks = list(blocks)
        self._parameters = [p for block in blocks for p in block.parameters()]  # read before every optimizer step
        for block in blocks:
            block.memory = self
            self.model_storages.update(LiveBytes.key(t) for t in [*block.parameters(), *block.buffers()])
        return self

    # ---- saved tensors --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Count what the graphs made in this thread save, until they release it."""
        previous = getattr(_ACTIVE, "meter", None)
        _ACTIVE.meter = self
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
                yield
        finally:
            _ACTIVE.meter = previous

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Tag what is saved meanwhile (in this thread) as `name` ("heads"; "layer" otherwise)."""
        before = getattr(self._part, "name", "layer")
        self._part.name = name
        try:
            yield
        finally:
            self._part.name = before

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        return _Saved(tensor, self.saved, getattr(self._part, "name", "layer"), self.model_storages)

    def saved_now(self) -> int:
        """Bytes the graphs of this process hold for backward now."""
        return self.saved.total

    # ---- gradients, parameters, optimizer state -------------------------------------------------------------

    def before_step(self) -> None:
        """Called before an optimizer step: the gradients alive now in any of the process's blocks."""
        alive = sum(p.grad.nbytes for p in self._parameters if p.grad is not None)
        self.gradient_peak = max(self.gradient_peak, alive)

    # ---- messages -------------------------------------------------------------------------------------------

    def hold_message(self, tensors: Iterable[torch.Tensor], release):
        """Count a message's tensors until `release` is called; returns the release to call instead."""
        keys = [self.messages.hold(t) for t in tensors if isinstance(t, torch.Tensor)]

        def released() -> None:
            for key in keys:
                self.messages.drop(key)
            keys.clear()
            release()

        return released

    def report(self, device: torch.device | None = None) -> dict:
        """Peak bytes of each kind (summary.json's `memory`, and each stage's in stage_stats)."""
        parameters = self._parameters
        optimizer = sum(t.nbytes for block in self.blocks if getattr(block, "optimizer", None) is not None
                        for state in block.optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor))
        saved = self.saved.peak_by_tag
        report = {
            "parameters": sum(p.numel() for p in parameters),
            "parameter_bytes": sum(p.nbytes for p in parameters) + sum(b.nbytes for block in self.blocks for b in block.buffers()),
            "gradient_peak_bytes": self.gradient_peak,
            "optimizer_bytes": optimizer,
            "saved_peak_bytes": self.saved.peak,
            "saved_peak_layer_bytes": saved.get("layer", 0),
            "saved_peak_heads_bytes": saved.get("heads", 0),
            "messages_peak_bytes": self.messages.peak,
        }
        report["activations_peak_bytes"] = self.live.peak  # saved tensors and messages together, each storage once
        report["accounted_peak_bytes"] = (report["parameter_bytes"] + report["gradient_peak_bytes"] + optimizer
                                          + report["activations_peak_bytes"])
        if device is not None and device.type == "cuda":
            report["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        return report


_ACTIVE = threading.local()  # the meter counting in this thread, if any


def saved_tensors_hooks_under_meter(pack) -> contextlib.AbstractContextManager:
    """torch.autograd.graph.saved_tensors_hooks(pack, ...) that still reports to the meter counting in this thread:
    PyTorch runs only the innermost pair of hooks, so hooks of one's own inside MemoryMeter.saving() would
    otherwise hide every saved tensor from it (what `pack` returns is what the graph keeps, and is counted)."""
    meter = getattr(_ACTIVE, "meter", None)
    if meter is None:
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
    return torch.autograd.graph.saved_tensors_hooks(lambda tensor: meter._pack(pack(tensor)), _unpack)


def _unpack(saved: _Saved) -> torch.Tensor:
    if saved.tensor._version != saved.version:  # autograd's own check, which a pack hook turns off
        raise RuntimeError("one of the variables needed for gradient computation has been modified by an inplace "
                           f"operation: a saved tensor of shape {tuple(saved.tensor.shape)} is at version "
                           f"{saved.tensor._version}; expected version {saved.version} instead")
    return saved.tensor
