"""Read the training shards back: this rank's share of the images as zero-copy uint8 tensors.

The shards (written by :func:`~gfm_core.data.ingest.shards.write_shards`) are memory-mapped: an image is a
slice of the mapped data buffer that ``torch.from_numpy`` wraps without copying or parsing, and the page cache
is shared by every DataLoader worker and every rank on a node.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from gfm_core.data.ingest.shard_file import SHARD_SCHEMA
from gfm_core.data.ingest.shards import load_shard_index
from gfm_core.errors import ConfigError, DataValidationError

if TYPE_CHECKING:  # torch loads only when the shards are opened
    import torch


def rank_partition(
    n: int, rank: int, world_size: int, *, seed: int | None = None, epoch: int = 0
) -> np.ndarray:
    """The global indexes rank ``rank`` of ``world_size`` reads: disjoint, equal-length, remainder dropped.

    Rank ``r`` takes every ``world_size``-th item starting at ``r`` of the global order, which is the manifest
    order (``seed=None``) or a permutation drawn from ``(seed, epoch)``; ranks stay disjoint in every epoch,
    and each gets a mix of every source. ``n % world_size`` items are left out (a different set each epoch
    when shuffled).

    Raises:
        ConfigError: ``world_size < 1``, ``rank`` outside ``[0, world_size)``, or fewer items than ranks.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} must lie in [0, world_size={world_size})")
    if n < world_size:
        raise ConfigError(f"{n} item(s) cannot be split over {world_size} ranks (each needs at least one)")
    per_rank = n // world_size
    if seed is None:
        order = np.arange(n, dtype=np.int64)
    else:
        order = np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)
    return order[rank : per_rank * world_size : world_size]


class _Shards:
    """The memory-mapped shard files of one generation (opened lazily, once per process)."""

    def __init__(self, shard_dir: Path, index: dict[str, Any]) -> None:
        import torch

        self.files = [shard_dir / s["file"] for s in index["shards"]]
        self.counts = [int(s["images"]) for s in index["shards"]]
        n = sum(self.counts)
        self.buffer = np.empty(n, dtype=np.int32)  # which data buffer holds item i
        self.start = np.empty(n, dtype=np.int64)
        self.shape = np.empty((n, 3), dtype=np.int64)  # H, W, C
        self.paths: list[str] = []
        self.sources: list[str] = []
        self.sha256: list[str] = []
        self.data: list[torch.Tensor] = []
        self._maps: list[pa.MemoryMappedFile] = []
        pos = 0
        for file, count in zip(self.files, self.counts, strict=True):
            try:
                mm = pa.memory_map(str(file), "r")
                reader = pa.ipc.open_file(mm)
                if not reader.schema.equals(SHARD_SCHEMA):
                    raise DataValidationError(f"{file}: not a gfm shard (schema {reader.schema})")
                seen = 0
                for b in range(reader.num_record_batches):
                    rb = reader.get_batch(b)
                    col = rb.column("pixels")
                    offsets = np.frombuffer(col.buffers()[1], dtype=np.int64)[
                        col.offset : col.offset + len(col) + 1
                    ]
                    with warnings.catch_warnings():  # read-only mapping: items are views, never written
                        warnings.simplefilter("ignore", UserWarning)
                        data = torch.from_numpy(np.frombuffer(col.buffers()[2], dtype=np.uint8))
                    k = len(col)
                    if seen + k > count:
                        raise DataValidationError(
                            f"{file}: holds more images than the {count} index.json lists; rebuild the shards"
                        )
                    sl = slice(pos + seen, pos + seen + k)
                    self.buffer[sl] = len(self.data)
                    self.start[sl] = offsets[:-1]
                    self.shape[sl, 0] = rb.column("height").to_numpy()
                    self.shape[sl, 1] = rb.column("width").to_numpy()
                    self.shape[sl, 2] = rb.column("channels").to_numpy()
                    self.paths.extend(rb.column("path").to_pylist())
                    self.sources.extend(rb.column("source").to_pylist())
                    self.sha256.extend(rb.column("sha256").to_pylist())
                    self.data.append(data)
                    seen += k
                self._maps.append(mm)
            except (OSError, pa.ArrowException) as e:
                raise DataValidationError(
                    f"{file}: cannot read the shard ({e}); rebuild the shards with write_shards"
                ) from e
            if seen != count:
                raise DataValidationError(
                    f"{file}: holds {seen} image(s), index.json says {count}; rebuild the shards"
                )
            pos += count

    def view(self, i: int) -> torch.Tensor:
        """Item ``i`` (global) as a read-only uint8 ``[C, H, W]`` view of the mapping."""
        h, w, c = self.shape[i]
        s = int(self.start[i])
        flat = self.data[self.buffer[i]][s : s + h * w * c]
        return flat.view(int(h), int(w), int(c)).permute(2, 0, 1)



class ShardDataset:
    """This rank's share of the shard images, as uint8 ``[C, H, W]`` tensors (no decoding, no copy).

    A map-style dataset (``__len__`` and ``__getitem__``) for :class:`torch.utils.data.DataLoader`; pickling
    it (to loader workers) sends only paths and indexes, and each process maps the files itself.

    Args:
        shard_dir: folder written by :func:`~gfm_core.data.ingest.shards.write_shards`.
        rank: this process's rank.
        world_size: number of ranks; each gets ``images // world_size`` items, disjoint from the others'.
        seed: None = a fixed split (rank ``r`` reads global items ``r, r + W, ...``); an int = a new split per
            epoch drawn from ``(seed, epoch)`` (see :func:`rank_partition` and :meth:`set_epoch`).

    Raises:
        DataValidationError: the index or a shard is missing or unreadable.
        ConfigError: bad rank/world size, or fewer images than ranks.
    """

    def __init__(
        self, shard_dir: str | Path, *, rank: int = 0, world_size: int = 1, seed: int | None = None
    ) -> None:
        self.shard_dir = Path(shard_dir)
        self.index = load_shard_index(self.shard_dir)
        self.content_hash: str = self.index["manifest_content_hash"]
        self.total = int(self.index["images"])
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0
        self.indices = rank_partition(self.total, rank, world_size, seed=seed)
        self._shards: _Shards | None = None

    @property
    def shards(self) -> _Shards:
        """The mapped shard files (opened on first use in each process)."""
        if self._shards is None:
            self._shards = _Shards(self.shard_dir, self.index)
        return self._shards

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_shards"] = None  # memory maps are reopened in the receiving process, never pickled
        return state

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (re-splits the ranks when ``seed`` is set)."""
        self.epoch = epoch
        if self.seed is not None:
            self.indices = rank_partition(self.total, self.rank, self.world_size, seed=self.seed, epoch=epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def global_index(self, index: int) -> int:
        """The position in the whole pile (sorted by path) of this rank's item ``index``."""
        return int(self.indices[index])

    def view(self, index: int) -> torch.Tensor:
        """Item ``index`` as a zero-copy, read-only uint8 ``[C, H, W]`` view (channels-last strides).

        The memory is the read-only file mapping: never modify it in place (use ``__getitem__`` for a copy).
        """
        return self.shards.view(self.global_index(index))

    def path(self, index: int) -> str:
        """Item ``index``'s path relative to the data root."""
        return self.shards.paths[self.global_index(index)]

    def __getitem__(self, index: int) -> torch.Tensor:
        """Item ``index`` as a writable uint8 ``[C, H, W]`` copy."""
        import torch

        return self.view(index).clone(memory_format=torch.contiguous_format)
