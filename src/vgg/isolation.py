"""Running a function over many files in worker processes, where a crash in native code costs one file, not the run.

``decode_pool`` does this for the server, one request at a time (the pool is replaced and the request tried once
more: one that crashes a fresh pool too is the culprit). Here it is for a whole list, as ``vgg doctor`` checks a
folder: each worker marks an item started and finished in shared memory, so after a crash the items that were
started and never finished are the suspects, and each is tried alone in a fresh process; the rest are carried on
in a fresh pool. An item whose process dies alone gets ``crashed(item)`` as its result.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Set in each worker by ``_init``: one byte per item (0 not started, 1 started, 2 finished).
_progress: Any = None


def _init(progress: Any) -> None:
    global _progress
    _progress = progress


def _run(fn: Callable[[T], R], index: int, item: T) -> R:
    _progress[index] = 1
    result = fn(item)
    _progress[index] = 2
    return result


def map_isolated(
    fn: Callable[[T], R],
    items: Sequence[T],
    workers: int,
    crashed: Callable[[T], R],
    chunk: int = 64,
    progress: Callable[[int], object] | None = None,
) -> list[R]:
    """``[fn(item) for item in items]`` in ``workers`` processes; a crashing item gets ``crashed(item)`` instead.

    Args:
        fn: a picklable function (module level); what it raises is raised here, as ``ProcessPoolExecutor`` does.
        items: picklable items.
        workers: processes.
        crashed: the result for an item whose process died while it was being worked on, alone.
        chunk: items per task (fewer round trips); a crash makes only the items it interrupted suspect.
        progress: called with the number of items each finished task did (items done again after a crash count
            again).
    """
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    started = context.RawArray("b", len(items))
    results: dict[int, R] = {}
    todo = list(range(len(items)))
    while todo:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init, initargs=(started,)) as pool:
            futures = [
                pool.submit(_batch, fn, [(i, items[i]) for i in todo[start : start + chunk]])
                for start in range(0, len(todo), chunk)
            ]
            broken = False
            for future in as_completed(futures):  # a crash completes every pending one with BrokenProcessPool
                if isinstance(future.exception(), BrokenProcessPool):
                    broken = True
                    continue
                done = future.result()  # raises what fn raised
                results.update(done)
                if progress is not None:
                    progress(len(done))
        if not broken:
            break
        # Started and never finished: what was in the hands of the process that died (or of its siblings).
        suspects = [i for i in todo if started[i] == 1] or [i for i in todo if i not in results]
        for i in suspects:
            results[i] = _alone(fn, items[i], context, crashed)
            if progress is not None:
                progress(1)
        todo = [i for i in todo if i not in results]  # finished items of a cut-short chunk are done again
        for i in todo:
            started[i] = 0
    return [results[i] for i in range(len(items))]


def _batch(fn: Callable[[T], R], indexed: list[tuple[int, T]]) -> dict[int, R]:
    return {i: _run(fn, i, item) for i, item in indexed}


def _alone(fn: Callable[[T], R], item: T, context: Any, crashed: Callable[[T], R]) -> R:
    with ProcessPoolExecutor(1, mp_context=context, initializer=_init, initargs=(context.RawArray("b", 1),)) as pool:
        try:
            return pool.submit(_run, fn, 0, item).result()
        except BrokenProcessPool:
            return crashed(item)
