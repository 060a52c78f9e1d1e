"""GroupCommitter: small uploads made durable by one thread, each folder fsynced once per batch.

A small file's commit (write, fsync, rename) takes less time than handing it
to a worker thread and back: the wake-ups and GIL hand-offs of one executor
job per file cost more than the file's own fsync. So small commits queue up
for one committer thread, which takes every commit that is ready, runs each
(making the file durable and visible), then fsyncs each folder the batch
renamed into, once, and only then answers them all. No put is acknowledged
before its file and its folder entry are on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
MAX_BATCH = 64  # commits answered together at most, so none waits long behind the others
IDLE_SECONDS = 5.0  # the thread exits after this long with nothing to commit

# A commit's work: makes one file durable and visible; returns its result and
# the folder whose entry for it still needs an fsync.
Job = Callable[[], tuple[T, str]]
# A commit's answer: its future, and its result or error.
Answer = tuple[asyncio.Future[T], T | None, BaseException | None]


def fsync_folder(folder: str) -> None:
    """Makes the entries of `folder` (a rename into it) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupCommitter(Generic[T]):
    """Runs submitted jobs in order on one thread (started on demand), batching the folder fsyncs."""

    def __init__(self, folder_error: Callable[[OSError], BaseException]) -> None:
        self._folder_error = folder_error  # what a failed folder fsync raises to the puts it answers
        self._jobs: queue.SimpleQueue[tuple[Job[T], asyncio.AbstractEventLoop, asyncio.Future[T]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = False

    def submit(self, job: Job[T]) -> asyncio.Future[T]:
        """Queues `job`; the future answers once its file and folder entry are durable.

        The job runs even if the future is cancelled: a commit once started
        is finished, never left halfway.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._jobs.put((job, loop, future))
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="drived-commit", daemon=True).start()
        return future

    def _run(self) -> None:
        while True:
            try:
                batch = [self._jobs.get(timeout=IDLE_SECONDS)]
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._running = False
                        return
                continue
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            self._commit(batch)

    def _commit(self, batch: list[tuple[Job[T], asyncio.AbstractEventLoop, asyncio.Future[T]]]) -> None:
        outcomes: list[tuple[T | None, BaseException | None, str]] = []  # result, error, folder to fsync
        for job, _, _ in batch:
            try:
                done, folder = job()
                outcomes.append((done, None, folder))
            except BaseException as err:  # answered to its own put; the batch goes on
                outcomes.append((None, err, ""))
        folder_errors: dict[str, BaseException | None] = {}
        for folder in {folder for _, _, folder in outcomes if folder}:
            try:
                fsync_folder(folder)
                folder_errors[folder] = None
            except OSError as err:
                folder_errors[folder] = self._folder_error(err)
        answers: dict[asyncio.AbstractEventLoop, list[Answer[T]]] = {}  # one wake-up of each loop per batch
        for (_, loop, future), (result, error, folder) in zip(batch, outcomes, strict=True):
            answers.setdefault(loop, []).append((future, result, error or folder_errors.get(folder)))
        for loop, its_answers in answers.items():
            with contextlib.suppress(RuntimeError):  # the loop was closed: nobody waits for the answers
                loop.call_soon_threadsafe(_answer, its_answers)


def _answer(answers: list[Answer[T]]) -> None:
    for future, result, error in answers:
        if future.cancelled():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]  # a job without error returned its result
