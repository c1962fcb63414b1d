"""Seeds derived from the run seed, so that every process draws exactly the numbers the sequential run draws."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch


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
    """Run module construction under a derived seed without touching the caller's global CPU random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, *parts))
        yield
