"""A process pool that survives its workers dying (decoder segfaults, the OOM killer)."""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def _apply(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    return [fn(x) for x in items]


def map_isolated(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    workers: int,
    chunk_size: int,
    on_crash: Callable[[T, str], R],
    on_done: Callable[[int], object] = lambda n: None,
    preload: Sequence[str] = (),
) -> list[R]:
    """``[fn(x) for x in items]`` in ``workers`` processes, surviving processes that die.

    Chunks lost to a dead worker (a segfault, the OOM killer) are retried one item at a time in a
    single-worker pool; an item that kills that worker too (or raises) gets ``on_crash(item, why)`` as its
    result. ``workers=0`` runs everything in this process. ``preload`` names modules the
    forkserver imports once. Results keep the order of ``items``.
    """
    if workers == 0:
        out = []
        for x in items:
            out.append(fn(x))
            on_done(1)
        return out
    # Not fork: the parent may hold threads (torch, dagster) and GDAL state. A forkserver starts one clean
    # process that imports the readers once and forks workers from it (cheap pool restarts after a crash).
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    results: dict[int, R] = {}
    pending = deque(range(s, min(s + chunk_size, len(items))) for s in range(0, len(items), chunk_size))
    suspects: list[int] = []
    while pending:  # one pool per pass; a pass ends early when a worker dies
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            inflight: dict[Future[list[R]], range] = {}
            broken = False
            while inflight or (pending and not broken):
                while pending and not broken and len(inflight) < 2 * workers:
                    chunk = pending.popleft()
                    try:
                        inflight[pool.submit(_apply, fn, [items[i] for i in chunk])] = chunk
                    except BrokenProcessPool:
                        pending.appendleft(chunk)
                        broken = True
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in done:
                    chunk = inflight.pop(fut)
                    try:
                        values = fut.result()
                    except Exception:  # BrokenProcessPool, or a result that failed to pickle
                        broken = True
                        suspects.extend(chunk)
                        continue
                    results.update(zip(chunk, values, strict=True))
                    on_done(len(chunk))
    if suspects:
        log.warning("a reader process died; retrying %d file(s) one at a time", len(suspects))
    single: ProcessPoolExecutor | None = None
    try:
        for i in sorted(suspects):
            single = single or ProcessPoolExecutor(max_workers=1, mp_context=ctx)
            try:
                results[i] = single.submit(fn, items[i]).result()
            except BrokenProcessPool:
                why = "the reader process died on this file (a crash in the image decoder, or out of memory)"
                results[i] = on_crash(items[i], why)
                single.shutdown()
                single = None
            except Exception as e:
                results[i] = on_crash(items[i], f"{type(e).__name__}: {e}")
            on_done(1)
    finally:
        if single is not None:
            single.shutdown()
    return [results[i] for i in range(len(items))]
