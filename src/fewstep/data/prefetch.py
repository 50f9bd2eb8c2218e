"""Batches read ahead of the step: one background thread fills a small queue per data stream.

A data module that reads from disk (``data=latents``: memory-mapped shards, a page fault per row that is not in
the page cache) sets ``prefetch`` to how many batches a stream may read ahead (``data.prefetch``, 2 by default;
0 reads in the step as before). The loop then takes its micro-batches from :class:`Prefetcher`, whose thread reads
the streams in the order the loop consumes them (slot 0, slot 1, …, then the next step), so the batches, their
order and where a resumed run starts are exactly those of the synchronous reader: only *when* a batch is read
changes. On a CUDA device the thread also pins each batch's memory, so ``Batch.to`` copies it without blocking
the host. An error in the reader reaches the step that would have read it, as the same exception.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from fewstep.data.base import Batch, cond_map


def pinned(batch: Batch) -> Batch:
    """``batch`` in page-locked host memory (a non-blocking copy to a GPU needs it)."""
    return Batch(batch.x.pin_memory(), cond_map(lambda v: v.pin_memory(), batch.cond),
                 cond_map(lambda v: v.pin_memory(), batch.null_cond))  # fmt: skip


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Reads ``streams`` round-robin in a daemon thread, ``depth`` batches ahead per stream; ``streams_out``
    are iterators the loop takes batches from in the same order. ``close()`` stops the thread."""

    def __init__(self, streams: list[Iterator[Batch]], depth: int = 2, pin: bool = False):
        if depth < 1:
            raise ValueError(f"data.prefetch={depth}: give the number of batches to read ahead (>= 1), or 0 for none")
        self._streams = streams
        self._queues = [queue.Queue(maxsize=depth) for _ in streams]
        self._pin = pin
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fewstep-prefetch", daemon=True)
        self._thread.start()
        self.streams_out = [self._take(i) for i in range(len(streams))]

    def _put(self, i: int, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queues[i].put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for i, stream in enumerate(self._streams):
                    batch = next(stream)
                    if not self._put(i, pinned(batch) if self._pin else batch):
                        return
        except BaseException as err:  # noqa: BLE001 - handed to the step that reads next, raised there
            for i in range(len(self._queues)):
                if not self._put(i, _Failure(err)):
                    return

    def _take(self, i: int) -> Iterator[Batch]:
        while True:
            item = self._queues[i].get()
            if isinstance(item, _Failure):
                if isinstance(item.error, StopIteration):  # a finite stream ended: so does this one
                    return
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
