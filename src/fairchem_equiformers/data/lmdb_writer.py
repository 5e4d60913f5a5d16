"""Writing OC20-style LMDB folders that fairchem's ``lmdb`` dataset reads unmodified.

A split folder holds ``data.lmdb`` (keys ``"0"``..``"N-1"`` plus a pickled ``length``, each value a
pickled torch_geometric ``Data``) and ``metadata.npz`` with ``natoms`` (for ``load_balancing:
atoms``).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from types import TracebackType

import lmdb
import numpy as np
import torch
from torch_geometric.data import Data

LMDB_NAME = "data.lmdb"
METADATA_NAME = "metadata.npz"
MAP_SIZE = 1 << 40  # 1 TiB of address space; the file only grows to what is written
COMMIT_EVERY = 500


class _DeterministicPickler(pickle.Pickler):
    """Pickles tensors through numpy, so equal data gives equal bytes in any process.

    torch's own tensor pickling embeds the storage's memory address; here a tensor becomes
    ``torch.tensor(<numpy array>)``, which plain ``pickle.loads`` (and so fairchem) restores with
    the same dtype, shape and values.
    """

    def reducer_override(self, obj: object) -> object:
        if type(obj) is torch.Tensor:
            return torch.tensor, (obj.detach().cpu().numpy(),)
        return NotImplemented


def dumps(obj: object) -> bytes:
    """Pickle ``obj`` (highest protocol) with process-independent bytes for its tensors."""
    buffer = io.BytesIO()
    _DeterministicPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


class LmdbWriter:
    """Streams ``Data`` objects into ``<folder>/data.lmdb``, committing every ``COMMIT_EVERY`` entries.

    ``close()`` stores the pickled ``length``, writes ``metadata.npz`` and returns the number of
    entries. Use as a context manager; on an exception the partial folder is left for the caller
    to remove.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=False)
        self._env = lmdb.open(str(folder / LMDB_NAME), map_size=MAP_SIZE, subdir=False, lock=False)
        self._txn = self._env.begin(write=True)
        self._natoms: list[int] = []

    def __len__(self) -> int:
        return len(self._natoms)

    def add(self, data: Data) -> None:
        """Append one graph under the next integer key."""
        self._txn.put(str(len(self._natoms)).encode("ascii"), dumps(data))
        self._natoms.append(int(data.natoms))
        if len(self._natoms) % COMMIT_EVERY == 0:
            self._txn.commit()
            self._txn = self._env.begin(write=True)

    def close(self) -> int:
        """Commit, store ``length`` and ``metadata.npz``; returns the number of entries."""
        self._txn.put(b"length", dumps(len(self._natoms)))
        self._txn.commit()
        self._env.sync()
        self._env.close()
        np.savez(self.folder / METADATA_NAME, natoms=np.asarray(self._natoms, dtype=np.int64))
        return len(self._natoms)

    def abort(self) -> None:
        """Drop the open transaction and close the file (after an error)."""
        self._txn.abort()
        self._env.close()

    def __enter__(self) -> LmdbWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SplitWriters:
    """One ``LmdbWriter`` per split of a task, in ``<root>/<task>/<split>``.

    Use as a context manager: on leaving it every split is closed (``counts`` then holds the
    entries per split) or, after an exception, aborted.
    """

    def __init__(self, root: Path, task: str, splits: list[str]) -> None:
        self.task = task
        self.writers = {split: LmdbWriter(root / task / split) for split in splits}
        self.counts: dict[str, int] = {}

    def __enter__(self) -> SplitWriters:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.counts = self.close()
        else:
            self.abort()

    def add(self, split: str, data: Data) -> None:
        """Append ``data`` to ``split``."""
        self.writers[split].add(data)

    def close(self) -> dict[str, int]:
        """Close every split; returns ``{"<task>/<split>": entries}``."""
        return {f"{self.task}/{split}": writer.close() for split, writer in self.writers.items()}

    def abort(self) -> None:
        """Close every split without finishing it (after an error)."""
        for writer in self.writers.values():
            writer.abort()
