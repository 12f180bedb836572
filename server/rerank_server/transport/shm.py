"""Batch segments in shared memory: token rows go to a worker, scores come back.

The front-end owns every segment (`OwnedSegment`: created, written, unlinked by
it, and registered with multiprocessing's resource tracker so even a killed
front-end leaves nothing in /dev/shm). A worker maps a segment by name
(`AttachedSegment`) without registering it, so its death never unlinks what
the front-end still uses. Only a small `BatchDescriptor` crosses the control
pipe; arrays never do.

Layout of one segment, for `max_tokens` token slots and `max_rows` rows, laid out from the model
spec's columns: each token column (input_ids first) as int32[max_tokens], packed row after row;
lengths int32[max_rows]; each per-row value as int32[max_rows]; scores float32[max_rows].
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np
import numpy.typing as npt

from rerank_server.families.base import ModelSpec, TokenBatch

SEGMENT_PREFIX = "rerank-"
SHM_DIR = "/dev/shm"


@dataclass(frozen=True)
class SegmentLayout:
    max_tokens: int
    max_rows: int
    token_columns: tuple[str, ...] = ("input_ids",)
    row_columns: tuple[str, ...] = ()

    @classmethod
    def for_spec(cls, spec: ModelSpec, max_tokens: int, max_rows: int) -> SegmentLayout:
        return cls(max_tokens, max_rows, ("input_ids", *spec.token_columns), tuple(spec.row_values))

    def offsets(self) -> dict[str, int]:
        """Byte offset of every array: token columns, then "lengths", row columns, "scores"."""
        offsets = {}
        position = 0
        for name in self.token_columns:
            offsets[name] = position
            position += 4 * self.max_tokens
        for name in ("lengths", *self.row_columns, "scores"):
            offsets[name] = position
            position += 4 * self.max_rows
        offsets["end"] = position
        return offsets

    @property
    def size(self) -> int:
        return self.offsets()["end"]


@dataclass(frozen=True)
class BatchDescriptor:
    """What crosses the control pipe for one batch: which segment, and the batch's shape."""

    batch_id: int
    segment: int
    rows: int
    tokens: int  # all rows' tokens together


class _SegmentViews:
    """Typed numpy views over one segment's buffer."""

    def __init__(self, buffer: memoryview | mmap.mmap, layout: SegmentLayout) -> None:
        self.layout = layout
        offsets = layout.offsets()
        self._tokens = {
            name: np.frombuffer(buffer, np.int32, layout.max_tokens, offsets[name])
            for name in layout.token_columns
        }
        self._rows = {
            name: np.frombuffer(buffer, np.int32, layout.max_rows, offsets[name])
            for name in ("lengths", *layout.row_columns)
        }
        self._scores = np.frombuffer(buffer, np.float32, layout.max_rows, offsets["scores"])

    def _check_shape(self, rows: int, tokens: int) -> None:
        if rows > self.layout.max_rows or tokens > self.layout.max_tokens:
            raise ValueError(f"batch of {rows} rows, {tokens} tokens does not fit a segment of {self.layout}")

    def write(self, batch: TokenBatch) -> tuple[int, int]:
        rows, tokens = batch.rows, int(batch.lengths.sum())
        self._check_shape(rows, tokens)
        for name, view in self._tokens.items():
            view[:tokens] = batch.tokens[name]
        self._rows["lengths"][:rows] = batch.lengths
        for name in self.layout.row_columns:
            self._rows[name][:rows] = batch.values[name]
        return rows, tokens

    def batch(self, rows: int, tokens: int) -> TokenBatch:
        self._check_shape(rows, tokens)
        return TokenBatch(
            lengths=self._rows["lengths"][:rows],
            tokens={name: view[:tokens] for name, view in self._tokens.items()},
            values={name: self._rows[name][:rows] for name in self.layout.row_columns},
        )

    def scores(self, rows: int) -> npt.NDArray[np.float32]:
        self._check_shape(rows, 0)
        return self._scores[:rows]

    def release(self) -> None:
        del self._tokens, self._rows, self._scores


class OwnedSegment:
    """A segment the front-end creates and alone unlinks."""

    def __init__(self, layout: SegmentLayout, label: str = "") -> None:
        name = f"{SEGMENT_PREFIX}{os.getpid()}-{label}{secrets.token_hex(4)}"
        shm = shared_memory.SharedMemory(name=name, create=True, size=layout.size)
        if shm.buf is None:
            raise OSError(f"shared memory segment {name} has no buffer")
        self._shm: shared_memory.SharedMemory | None = shm
        self.name = shm.name.lstrip("/")
        self.layout = layout
        self._views = _SegmentViews(shm.buf, layout)

    def write_batch(self, batch_id: int, segment_index: int, batch: TokenBatch) -> BatchDescriptor:
        rows, tokens = self._views.write(batch)
        return BatchDescriptor(batch_id, segment_index, rows, tokens)

    def read_scores(self, rows: int) -> npt.NDArray[np.float32]:
        return self._views.scores(rows).copy()

    def unlink(self) -> None:
        """Free the segment; safe to call twice."""
        if self._shm is None:
            return
        self._views.release()
        self._shm.close()
        self._shm.unlink()
        self._shm = None


class AttachedSegment:
    """A worker's mapping of a segment, by name; never unlinks it."""

    def __init__(self, name: str, layout: SegmentLayout) -> None:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, layout.size)
        finally:
            os.close(fd)
        self._views = _SegmentViews(self._map, layout)

    def read_batch(self, descriptor: BatchDescriptor) -> TokenBatch:
        return self._views.batch(descriptor.rows, descriptor.tokens)

    def write_scores(self, scores: npt.NDArray[np.float32]) -> None:
        self._views.scores(len(scores))[...] = scores

    def close(self) -> None:
        self._views.release()
        # BufferError: a caller still holds a batch view; the mapping then ends with the process.
        with contextlib.suppress(BufferError):
            self._map.close()


def leftover_segments(pid: int | None = None) -> list[str]:
    """Segments of this server in /dev/shm (of one front-end pid, if given)."""
    prefix = SEGMENT_PREFIX if pid is None else f"{SEGMENT_PREFIX}{pid}-"
    try:
        return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(prefix))
    except FileNotFoundError:
        return []
