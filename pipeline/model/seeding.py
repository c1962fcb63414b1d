"""Seeds derived from the run seed, so that every process draws exactly the numbers the sequential run draws."""

from __future__ import annotations

import contextlib
import hashlib
import random
import sys
import threading
from typing import Iterator

import torch


# The process's global generators (torch's default ones, Python's, numpy's) are used by one code path at a time:
# seeded_init, and a block's own_randomness (pipeline/block/blocks.py), hold this while they stand in other states. Stages
# that are threads of one process (pipeline/run/in_process.py) would otherwise reseed or swap them under each other.
GLOBAL_GENERATORS = threading.RLock()


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed that depends only on the run seed and a path of names, e.g. (seed, "block", 3)."""
    digest = hashlib.blake2b(repr((seed,) + parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(seed: int, *parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A private random generator for one consumer (a block's dropout, an epoch's data order)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *parts))
    return gen


@contextlib.contextmanager
def seeded_init(seed: int, *parts: object) -> Iterator[None]:
    """Run code that draws from the global generators (module construction, a network factory that builds its
    modules up front) under a derived seed, without touching the caller's random state: torch's CPU generator,
    Python's `random` and, where numpy is loaded, numpy's global one. So the code draws the same numbers in every
    process, whatever that process drew before."""
    derived = derive_seed(seed, *parts)
    numpy = sys.modules.get("numpy")
    with GLOBAL_GENERATORS, torch.random.fork_rng(devices=[]):
        python_state = random.getstate()  # under the lock: another thread's seeded_init cannot be half way
        numpy_state = numpy.random.get_state() if numpy is not None else None
        torch.manual_seed(derived)
        random.seed(derived)
        if numpy is not None:
            numpy.random.seed(derived % (1 << 32))
        try:
            yield
        finally:
            random.setstate(python_state)
            if numpy is not None:
                numpy.random.set_state(numpy_state)
