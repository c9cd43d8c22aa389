"""Bounding the CPU threads one job uses, so that several jobs can share a machine.

Why a shared machine slowed a job far more than twofold: torch (its own OpenMP runtime and MKL) and faiss
(a second OpenMP runtime, with OpenBLAS) each start one thread per core by default, and image decoding adds
a pool of up to four threads. A fit or a scoring run is many short parallel regions (a backbone layer, a
faiss search block, a re-ranking gather), each ending at a barrier that waits for its slowest thread. With
more runnable threads than cores, some thread of every region is descheduled, so every region waits for a
scheduler time slice (milliseconds) instead of microseconds of work, while the others spin at the barrier
and burn the slice the late one needs. Two such jobs on two cores therefore take far more than twice as
long. With each job's threads bounded to its share of the cores, regions no longer wait on each other and
two jobs each take about twice the time of one (``benchmarks/concurrent_fits.py`` measures it).

OpenMP thread counts are per calling thread: ``limit_threads`` bounds the thread that runs the job (and
the decode threads it starts), not the whole process, so several app sessions in one process each keep
their own bound.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# Image decoding runs in a small pool next to the backbone; more than this does not decode faster.
_MAX_DECODE_WORKERS = 4
# The current job's thread bound, seen by the decode pools it starts (None: no bound set).
_JOB_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar("softpatch_job_threads", default=None)
# Jobs running now in this process under ``job_slot`` (the app's concurrent fits).
_ACTIVE_JOBS = 0
_ACTIVE_LOCK = threading.Lock()


@dataclass(frozen=True)
class ThreadLimits:
    """Threads the calling thread's work may use, per library."""

    torch: int  # torch intra-op threads (OpenMP and MKL)
    faiss: int | None  # faiss's OpenMP threads; None when faiss cannot be imported
    decode: int  # image-decoding threads (``_load_batches``, the duplicate check's pixel hashes)


def cpu_count() -> int:
    """Cores this process may run on: its CPU affinity, further bounded by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max" and int(period) > 0:
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def prefer_passive_waiting() -> bool:
    """Let idle OpenMP threads sleep at once instead of spinning (``OMP_WAIT_POLICY=PASSIVE``), unless set.

    Read by each OpenMP runtime when it loads (torch's and faiss's), so it only takes effect before torch and
    faiss are imported: entry points (the CLI, the app) call it first. Spinning threads help a job alone on
    quiet cores; beside other work they take the time slices the job's late threads need. Returns whether
    the policy is passive for the runtimes still to load.
    """
    if "torch" in sys.modules or "faiss" in sys.modules:
        return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return os.environ["OMP_WAIT_POLICY"].upper() == "PASSIVE"


def job_threads(requested: int | None, concurrent_jobs: int = 1) -> int:
    """Threads for one job: ``requested``, or for ``None`` ("auto") the cores shared among ``concurrent_jobs``."""
    if requested is not None:
        return max(1, int(requested))
    return max(1, cpu_count() // max(1, concurrent_jobs))


def _faiss():
    try:
        import faiss
    except ImportError:  # faiss is a dependency; without it there is nothing of it to bound
        return None
    return faiss


def current_limits() -> ThreadLimits:
    """The calling thread's thread counts now."""
    import torch

    faiss = _faiss()
    bound = _JOB_THREADS.get()
    return ThreadLimits(
        torch=torch.get_num_threads(),
        faiss=faiss.omp_get_max_threads() if faiss is not None else None,
        decode=min(_MAX_DECODE_WORKERS, bound if bound is not None else cpu_count()),
    )


def _apply(torch_threads: int, faiss_threads: int | None) -> None:
    import torch

    torch.set_num_threads(torch_threads)
    faiss = _faiss()
    if faiss is not None and faiss_threads is not None:
        faiss.omp_set_num_threads(faiss_threads)


@contextlib.contextmanager
def limit_threads(threads: int) -> Iterator[ThreadLimits]:
    """Bound the work of the calling thread to ``threads`` threads (torch, faiss, image decoding); restored after.

    Yields the limits in force inside. OpenMP counts are per thread, so call it in the thread that works.
    """
    threads = max(1, int(threads))
    before = current_limits()
    token = _JOB_THREADS.set(threads)
    _apply(threads, threads)
    try:
        yield current_limits()
    finally:
        _JOB_THREADS.reset(token)
        _apply(before.torch, before.faiss)


def decode_workers() -> int:
    """Image-decoding threads the calling thread's job may start (its bound, at most four)."""
    return current_limits().decode


def decode_pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads for image decoding, each running torch and faiss on one thread.

    New threads start with OpenMP's process default (one thread per core) and do not see the caller's
    bound, so each is bounded by its initialiser; take ``workers`` from ``decode_workers()`` in the caller.
    """
    return ThreadPoolExecutor(max_workers=max(1, workers), initializer=_apply, initargs=(1, 1))


@contextlib.contextmanager
def job_slot(requested: int | None = None) -> Iterator[ThreadLimits]:
    """Run one of several concurrent jobs of this process (the app's fits) within its share of the cores.

    ``requested`` (``None`` = auto): threads for this job; auto divides the cores among the jobs running now,
    this one included. A job keeps the share it started with.
    """
    global _ACTIVE_JOBS
    with _ACTIVE_LOCK:
        _ACTIVE_JOBS += 1
        running = _ACTIVE_JOBS
    try:
        with limit_threads(job_threads(requested, running)) as limits:
            yield limits
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE_JOBS -= 1


def active_jobs() -> int:
    """Jobs running now under ``job_slot`` in this process."""
    return _ACTIVE_JOBS
