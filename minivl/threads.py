"""Every core for NumPy's one-core passes: independent pieces of work run at once on a small thread pool.

NumPy's BLAS runs each GEMM on every core, but an elementwise pass (an exp, a division, a row
maximum) runs on one: in a prefill those passes (the attention softmax, SiLU, GELU) take as long
as a third of the GEMMs. They release the GIL, so two threads working on two disjoint slices run
on two cores at once. A fast path hands its independent pieces to `parallel` (the query blocks of
an attention, the chunks of an activation); each piece is computed by exactly the calls one thread
would make on it. An elementwise piece is therefore the same bit for bit whatever the thread
count; a piece that runs GEMMs is the same up to the GEMM's accumulation order, since OpenBLAS may
pick another kernel for a one-thread call (tests/test_threads.py). torch_impl has no twin:
torch's intra-op thread pool does this itself.

MINIVL_NUM_THREADS sets the number of workers (default: the CPUs this process may run on); 1 runs
every piece in the caller, in order, as a learner stepping through in a debugger wants.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import nullcontext
from functools import lru_cache

from minivl.errors import ConfigError

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()
_blas = None  # threadpoolctl's controller of the BLAS libraries loaded, made on first use
_worker = threading.local()  # .active is True inside a piece: a nested `parallel` runs in place


def num_threads() -> int:
    """Workers `parallel` uses: MINIVL_NUM_THREADS, else the BLAS's own limit if one is set, else the CPUs.

    OPENBLAS_NUM_THREADS or OMP_NUM_THREADS (the usual ways to keep a process to fewer cores) cap it too.
    """
    value = os.environ.get("MINIVL_NUM_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"MINIVL_NUM_THREADS must be a whole number >= 1 (1 = no threads), got {value!r}")
        return int(value)
    cpus = _cpus()
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        limit = os.environ.get(name, "").strip()
        if limit.isdigit() and int(limit) >= 1:
            cpus = min(cpus, int(limit))
    return cpus


def parallel(tasks, calls_blas: bool = False) -> list:
    """[task() for task in tasks], the tasks run at once on `num_threads()` threads; results in order.

    The caller is one of the threads: it takes tasks from the list as the pool's workers do, so
    the work starts at once instead of after a worker wakes (0.2 ms on a 2-core VM here, before a
    layer's 4 ms of attention blocks), and a worker that wakes after the list is done is cancelled,
    not waited for. In the caller alone when one thread is asked for, when there is a single task,
    or when called from inside a task (a nested call would wait on the workers it occupies). An
    exception in a task is raised here, the first in task order, after every task has finished.
    calls_blas: the tasks run GEMMs. BLAS would give each of them every core (two tasks on two
    cores: four spinning threads); while these tasks run it gives each one thread instead
    (threadpoolctl).
    """
    tasks = list(tasks)
    workers = min(num_threads(), len(tasks))
    if workers <= 1 or getattr(_worker, "active", False):
        return [task() for task in tasks]
    results, errors = [None] * len(tasks), [None] * len(tasks)
    claimed, lock = iter(range(len(tasks))), threading.Lock()

    def take_tasks() -> None:  # run unclaimed tasks until none is left
        while True:
            with lock:
                index = next(claimed, None)
            if index is None:
                return
            try:
                results[index] = tasks[index]()
            except BaseException as error:  # noqa: BLE001  (raised below, in the caller)
                errors[index] = error

    with _one_blas_thread_each() if calls_blas else nullcontext():
        helpers = [_get_pool(workers - 1).submit(_run_as_worker, take_tasks) for _ in range(workers - 1)]
        _run_as_worker(take_tasks)
        # a helper still queued finds nothing left: cancel it; one that started finishes its task first
        wait([helper for helper in helpers if not helper.cancel()])
    for error in errors:
        if error is not None:
            raise error
    return results


@lru_cache(maxsize=1)
def _cpus() -> int:
    """The CPUs this process may run on (read once: a syscall)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def split(length: int, pieces: int, minimum: int = 1) -> list[slice]:
    """[0, length) cut into at most `pieces` contiguous slices of at least `minimum` (the last takes the rest)."""
    pieces = max(1, min(pieces, length // max(minimum, 1)))
    bounds = [length * i // pieces for i in range(pieces + 1)]
    return [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]


def _one_blas_thread_each():
    """A context in which NumPy's BLAS runs each call on the calling thread alone."""
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


def _run_as_worker(task):
    _worker.active = True
    try:
        return task()
    finally:
        _worker.active = False


def _get_pool(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(workers, thread_name_prefix="minivl"), workers
        return _pool


def _forget_pool_after_fork() -> None:
    """A forked child has none of the parent's threads: it starts a pool of its own when it needs one."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)
