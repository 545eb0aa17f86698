"""The seeded order of an epoch: a hash per key, and the shuffle of a block of rows built on it.

Kept apart from the rest of `janus_lab.data` and free of torch and transformers: ingest's
driver (which never loads the model) orders records with it, and checks and benchmarks
compute an epoch's order without the model stack.
"""

from __future__ import annotations

import hashlib

import numpy as np


def order_key(seed: int, epoch: int, sample_id: str) -> int:
    """The sort key that fixes a sample's place in an epoch (a signed 63-bit hash)."""
    digest = hashlib.blake2b(f"order:{seed}:{epoch}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ShuffleWithinBlock:
    """Orders the rows of a block by their seeded hash (a per-epoch shuffle inside a window of rows)."""

    def __init__(self, seed: int, epoch: int):
        self.seed, self.epoch = seed, epoch

    def __call__(self, table):
        import pyarrow as pa

        keys = np.array([order_key(self.seed, self.epoch, str(i)) for i in table.column("id").to_pylist()],
                        dtype=np.int64)
        return table.take(pa.array(np.argsort(keys, kind="stable")))
