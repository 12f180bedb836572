"""Batch segments in shared memory: token rows go to a worker, scores come back.

The front-end owns every segment (`OwnedSegment`: created, written, unlinked by
it, and registered with multiprocessing's resource tracker so even a killed
front-end leaves nothing in /dev/shm). A worker maps a segment by name
(`AttachedSegment`) without registering it, so its death never unlinks what
the front-end still uses. Only a small `BatchDescriptor` crosses the control
pipe; arrays never do.

Layout of one segment, for `max_tokens` token slots and `max_rows` rows:
input_ids int32[max_tokens] | scores float32[max_rows] |
attention_mask int8[max_tokens] | token_type_ids int8[max_tokens]
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

SEGMENT_PREFIX = "rerank-"
SHM_DIR = "/dev/shm"


@dataclass(frozen=True)
class SegmentLayout:
    max_tokens: int
    max_rows: int

    @property
    def ids_offset(self) -> int:
        return 0

    @property
    def scores_offset(self) -> int:
        return 4 * self.max_tokens

    @property
    def mask_offset(self) -> int:
        return self.scores_offset + 4 * self.max_rows

    @property
    def types_offset(self) -> int:
        return self.mask_offset + self.max_tokens

    @property
    def size(self) -> int:
        return self.types_offset + self.max_tokens


@dataclass(frozen=True)
class BatchDescriptor:
    """What crosses the control pipe for one batch: which segment, and the batch's shape."""

    batch_id: int
    segment: int
    rows: int
    cols: int


@dataclass(frozen=True)
class BatchArrays:
    input_ids: npt.NDArray[np.int32]
    attention_mask: npt.NDArray[np.int8]
    token_type_ids: npt.NDArray[np.int8]


class _SegmentViews:
    """Typed numpy views over one segment's buffer."""

    def __init__(self, buffer: memoryview | mmap.mmap, layout: SegmentLayout) -> None:
        self.layout = layout
        self._ids = np.frombuffer(buffer, np.int32, layout.max_tokens, layout.ids_offset)
        self._scores = np.frombuffer(buffer, np.float32, layout.max_rows, layout.scores_offset)
        self._mask = np.frombuffer(buffer, np.int8, layout.max_tokens, layout.mask_offset)
        self._types = np.frombuffer(buffer, np.int8, layout.max_tokens, layout.types_offset)

    def _check_shape(self, rows: int, cols: int) -> None:
        if rows > self.layout.max_rows or rows * cols > self.layout.max_tokens:
            raise ValueError(f"batch {rows}x{cols} does not fit a segment of {self.layout}")

    def batch(self, rows: int, cols: int) -> BatchArrays:
        self._check_shape(rows, cols)
        n = rows * cols
        return BatchArrays(
            self._ids[:n].reshape(rows, cols),
            self._mask[:n].reshape(rows, cols),
            self._types[:n].reshape(rows, cols),
        )

    def scores(self, rows: int) -> npt.NDArray[np.float32]:
        self._check_shape(rows, 1)
        return self._scores[:rows]

    def release(self) -> None:
        del self._ids, self._scores, self._mask, self._types


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

    def write_batch(self, batch_id: int, segment_index: int, arrays: BatchArrays) -> BatchDescriptor:
        rows, cols = arrays.input_ids.shape
        target = self._views.batch(rows, cols)
        target.input_ids[...] = arrays.input_ids
        target.attention_mask[...] = arrays.attention_mask
        target.token_type_ids[...] = arrays.token_type_ids
        return BatchDescriptor(batch_id, segment_index, rows, cols)

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

    def read_batch(self, descriptor: BatchDescriptor) -> BatchArrays:
        return self._views.batch(descriptor.rows, descriptor.cols)

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
