"""The commit worker: a child process that makes small uploads durable and visible, in batches.

Committing a small file is a handful of system calls (create, write, utime,
fsync, close, rename) and little else. In a thread of the daemon, each of
them has to take the GIL back from the event loop when it returns, and with
the loop busy a commit took two to four times as long (`bench/WHY.md`). The
worker is a process of its own, with its own GIL. The daemon sends it every
commit that is ready as one batch; it commits the batch's files a few at a
time, fsyncs each folder the batch renamed into once, and only then answers.
No put is acknowledged before its file and its folder entry are on disk.
Each commit's `before_visible` (its claim's confirmation) is awaited after
it waited in the queue, for the commits that are ready together, and the
commit is sent as soon as it passed.

The daemon side is `CommitWorker`; `python -m drived.backends.commit_worker`
is the worker side, which reads batches from stdin and writes answers to
stdout as length-prefixed pickles. The worker also sums each file (sha256,
CRC32C, block table) and checks it against what the client sent, so that
hashing up to a megabyte never holds up the event loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import pickle
import signal
import struct
import sys
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar

from drive_client.files import write_all

from ..checksums import Checksums, ClientChecksums
from .stored import fsync_folder, make_durable, place, stored_bytes

# `base.BeforeVisible`, not imported: base brings grpc (~14 MiB) into the worker process.
BeforeVisible = Callable[[], Awaitable[None]]
LENGTH = struct.Struct("<I")  # the length of the pickle that follows
MAX_BATCH = 64  # commits answered together at most, so none waits long behind the others
MAX_BATCH_BYTES = 4 << 20  # and their bytes at most (but for a batch of one): each crosses the pipe in copies
CONFIRMS_IN_FLIGHT = 2  # batches whose `before_visible` is awaited at once: one that hangs leaves room for the others
# Files committed at once: the disk takes fsyncs in parallel faster than one after another
# (here 1,000 small files: 3,000/s one by one, 5,500/s four at a time).
COMMIT_THREADS = 4
PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent ends

# A small commit: the temporary file to write, the object's path, its bytes, and the checksums the client sent.
Job = tuple[str, str, bytes, ClientChecksums]
# What became of it: ("ok", generation, folders, sha256, CRC32C), ("mismatch", how the checksums
# differ) with nothing stored, ("error", errno, message), or ("unsynced", what "ok" says, errno, message, folder)
# when the fsync of one of its folders failed after its rename (the file is visible).
Outcome = tuple[Any, ...]
T = TypeVar("T")
R = TypeVar("R")


def _commit(tmp_path: str, path: str, whole: bytes) -> tuple[int, list[str]]:
    """Writes `whole` (the stored file) to a new `tmp_path`, makes it durable and renames it to `path`.

    Returns the generation and the folders to fsync (`place`); leaves no temporary file behind on error.
    """
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, whole)
        generation = make_durable(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp_path)
        raise
    os.close(fd)
    try:
        return generation, place(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise


def _failed(err: OSError) -> Outcome:
    return ("error", err.errno, err.strerror)


def _verify_and_commit(job: Job) -> Outcome:
    tmp_path, path, data, sent = job
    sums = Checksums()
    sums.update(data)
    mismatch = sent.mismatch(sums.sha256, sums.crc32c)
    if mismatch:  # verified before anything is created
        return ("mismatch", mismatch)
    try:
        generation, folders = _commit(tmp_path, path, stored_bytes(data, sums))
    except OSError as err:
        return _failed(err)
    return ("ok", generation, folders, sums.sha256, sums.crc32c)


def _fsync_folder(folder: str) -> Outcome | None:
    try:
        fsync_folder(folder)
    except OSError as err:
        return (*_failed(err), folder)
    return None


def _each(pool: ThreadPoolExecutor, work: Callable[[T], R], items: list[T]) -> Iterable[R]:
    """`work` of each item: at once in the pool, or right here for one item (no hand-off to a thread)."""
    return pool.map(work, items) if len(items) > 1 else map(work, items)


def commit_batch(jobs: list[Job], pool: ThreadPoolExecutor) -> list[Outcome]:
    """Commits the jobs at once, then fsyncs each folder they went into; a failure fails only its own jobs.

    The jobs of a batch go to different paths (`CommitWorker` sees to it), so their order does not matter.
    """
    outcomes = list(_each(pool, _verify_and_commit, jobs))
    folders = list({folder for outcome in outcomes if outcome[0] == "ok" for folder in outcome[2]})
    folder_errors = dict(zip(folders, _each(pool, _fsync_folder, folders), strict=True))
    return [_synced(outcome, folder_errors) if outcome[0] == "ok" else outcome for outcome in outcomes]


def _synced(outcome: Outcome, folder_errors: dict[str, Outcome | None]) -> Outcome:
    """A committed job's outcome, "unsynced" with the error of the first of its folders whose fsync failed."""
    error = next((error for error in map(folder_errors.get, outcome[2]) if error), None)
    return outcome if error is None else ("unsynced", *outcome[1:], *error[1:])


async def _visible_at_once() -> None:
    """The `before_visible` of a commit submitted without one."""


class _Closed(Exception):
    """A worker would be started after `CommitWorker.close`: the commits that need it fail instead."""


def _shutting_down() -> Exception:
    """What a commit fails with once its worker is closed: the daemon is shutting down (`drived.coordinator`, imported
    here: at the top it would bring grpc into the worker process)."""
    from ..coordinator import shutting_down

    return shutting_down()


class _Queued(NamedTuple):
    """A commit submitted: its job, what to await before it is sent, and the future its outcome goes to."""

    job: Job
    before_visible: BeforeVisible
    outcome: asyncio.Future[Outcome]


def _fail_shutting_down(commits: list[_Queued]) -> None:
    """Fails `commits` shutting down, but those whose caller stopped waiting (their future cancelled)."""
    for queued in commits:
        if not queued.outcome.done():
            queued.outcome.set_exception(_shutting_down())


class CommitWorker:
    """The daemon's side: sends the commits that are ready to the worker, one batch at a time.

    The `before_visible` of the commits that are ready is awaited for all of
    them at once (a shared coordinator makes that one round trip:
    `RedisCoordinator.renew`), and the commits that passed it go in the next
    batches sent. At most CONFIRMS_IN_FLIGHT such batches are awaited at a
    time: the commits submitted meanwhile wait and go together, and a
    `before_visible` that hangs holds up only its own batch while the others
    are confirmed and sent. The worker is started on the first commit and
    again after it has died, until `close`. A commit that was sent runs to
    its end even if its caller stops waiting.

    Each worker process holds `data_dir_locks` open (inherited) for its whole
    life, so the data dir's locks (`local.lock_data_dir`) stay held until
    the worker has ended too: a daemon killed drops its own hold at once,
    and a new daemon let in then would empty `tmp/` and write its uploads
    under the names that the old worker may still be renaming into place.
    """

    def __init__(self, data_dir_locks: tuple[int, ...] = ()) -> None:
        self._data_dir_locks = data_dir_locks  # the worker's `pass_fds`
        self._ready: list[_Queued] = []  # submitted, `before_visible` not yet called
        self._confirming: set[str] = set()  # the paths of the commits whose `before_visible` runs
        self._confirmed: list[_Queued] = []  # `before_visible` passed: for the next batch sent
        self._confirms = 0  # batches whose `before_visible` runs
        self._changed = asyncio.Event()  # set on a submit and when a batch's `before_visible` ends
        self._process: asyncio.subprocess.Process | None = None
        self._sending: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False  # `close` was called: no worker is started again

    def submit(self, job: Job, before_visible: BeforeVisible | None = None) -> asyncio.Future[Outcome]:
        """Queues `job`; the future answers with its outcome once file and folder entry are durable.

        `before_visible` is awaited before the job is sent (`CommitWorker`);
        what it raises, the future raises, and the job is not sent.
        """
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_exception(_shutting_down())
            return future
        self._ready.append(_Queued(job, before_visible or _visible_at_once, future))
        self._changed.set()
        if self._sending is None:
            self._sending = asyncio.create_task(self._send())
        return future

    async def _send(self) -> None:
        """Sends what passed its `before_visible`, else starts the `before_visible` of the next commits and waits."""
        try:
            while self._ready or self._confirming or self._confirmed:
                if self._confirmed:
                    await self._commit(self._next_batch(self._confirmed, set()))
                    continue
                self._changed.clear()
                batch = self._next_batch(self._ready, self._confirming) if self._confirms < CONFIRMS_IN_FLIGHT else []
                if batch:
                    self._confirms += 1
                    self._confirming.update(queued.job[1] for queued in batch)
                    task = asyncio.create_task(self._confirm(batch))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
                await self._changed.wait()
        finally:
            self._sending = None

    async def _confirm(self, batch: list[_Queued]) -> None:
        """Awaits the `before_visible` of `batch` all at once; each that raised fails with what it raised, and the
        others are confirmed."""
        try:
            raised = await asyncio.gather(*(queued.before_visible() for queued in batch), return_exceptions=True)
            for queued, error in zip(batch, raised, strict=True):
                self._confirming.discard(queued.job[1])
                if error is None:
                    self._confirmed.append(queued)
                elif not queued.outcome.done():
                    queued.outcome.set_exception(error)
        finally:
            self._confirms -= 1
            self._changed.set()

    async def _commit(self, batch: list[_Queued]) -> None:
        """Sends `batch` to the worker and answers each of its commits with its outcome; once the worker is closed
        (its `before_visible` ended after `close`), fails them shutting down instead."""
        try:
            outcomes = await self._call([queued.job for queued in batch])
        except _Closed:
            _fail_shutting_down(batch)
            return
        except (OSError, EOFError, pickle.UnpicklingError) as err:
            await self._stop()
            lost: Outcome = ("error", None, f"the commit worker failed ({err!r}); the put may not be stored")
            outcomes = [lost] * len(batch)
        for queued, outcome in zip(batch, outcomes, strict=True):
            if not queued.outcome.done():
                queued.outcome.set_result(outcome)

    @staticmethod
    def _next_batch(queue: list[_Queued], busy: set[str]) -> list[_Queued]:
        """Takes from `queue` the commits at its head, in order, up to MAX_BATCH, MAX_BATCH_BYTES and a commit of a
        path in `busy` or a second one of a path (which keeps the commits of one path in the order submitted)."""
        paths = set(busy)
        size = 0
        for taken, (job, _, _) in enumerate(queue):
            size += len(job[2])
            if taken == MAX_BATCH or job[1] in paths or (taken and size > MAX_BATCH_BYTES):
                break
            paths.add(job[1])
        else:
            taken = len(queue)
        batch = queue[:taken]
        del queue[:taken]
        return batch

    async def _call(self, jobs: list[Job]) -> list[Outcome]:
        frame = pickle.dumps(jobs, protocol=pickle.HIGHEST_PROTOCOL)
        process = await self._started()
        try:
            await self._write(process, frame)
        except ConnectionError:  # it died before it read the batch, so it did none of it: once more
            await self._stop()
            process = await self._started()
            await self._write(process, frame)
        assert process.stdout is not None
        try:
            (length,) = LENGTH.unpack(await process.stdout.readexactly(LENGTH.size))
            outcomes: list[Outcome] = pickle.loads(await process.stdout.readexactly(length))
        except asyncio.IncompleteReadError as err:
            raise EOFError(f"the worker exited with {await process.wait()}") from err
        return outcomes

    async def _started(self) -> asyncio.subprocess.Process:
        if self._closed:
            raise _Closed
        if self._process is None or self._process.returncode is not None:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", __name__, str(os.getpid()),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, pass_fds=self._data_dir_locks,
            )
            if self._closed:  # while it started: `close` found no process to stop
                await self._stop()
                raise _Closed
        return self._process

    @staticmethod
    async def _write(process: asyncio.subprocess.Process, frame: bytes) -> None:
        assert process.stdin is not None
        process.stdin.write(LENGTH.pack(len(frame)))
        process.stdin.write(frame)
        await process.stdin.drain()

    async def close(self) -> None:
        """Stops the worker for good: it finishes the batch it has, then exits. The commits not sent by then fail
        shutting down: those whose `before_visible` has not begun at once (no call to the coordinator for a commit
        that cannot be sent), those whose `before_visible` runs when it ends, and those submitted later at
        their submit. Idempotent."""
        self._closed = True
        _fail_shutting_down(self._ready)
        self._ready.clear()
        self._changed.set()
        await self._stop()

    async def _stop(self) -> None:
        """Stops the worker: it finishes the batch it has, then exits (the next batch starts another)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 30)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()


def _die_with(daemon: int) -> None:
    """Has the kernel kill this process as soon as the daemon, its parent, ends, however it ends (Linux).

    A daemon that stops closes the worker's stdin and waits for it; one
    killed cannot. Its worker, left to finish its batch, would go on
    renaming files into place after a daemon started again has stored newer
    versions of the same paths, and put its older ones, never acknowledged,
    over them. A system call the worker is in when the signal comes (a
    rename held by a busy disk or a hung mount) still runs to its end, which
    nothing can cut short: the data dir's lock, which the worker holds too
    (`CommitWorker`), keeps a new daemon out until then. Where there is no
    such signal (macOS), the worker ends after the batch it has, at the end
    of its stdin.
    """
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != daemon:  # it ended before that was set
        sys.exit(1)


def main() -> None:
    """The worker: answers each batch read from stdin on stdout, until stdin closes."""
    _die_with(int(sys.argv[1]))
    # Signals sent to the daemon's whole process group are meant for the daemon, which stops the worker when done: a
    # terminal's Ctrl-C, a supervisor's stop (systemd's KillMode=control-group SIGTERMs every process) or reload.
    for meant_for_the_daemon in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(meant_for_the_daemon, signal.SIG_IGN)
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    pool = ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="commit")
    while header := requests.read(LENGTH.size):
        (length,) = LENGTH.unpack(header)
        outcomes = commit_batch(pickle.loads(requests.read(length)), pool)
        frame = pickle.dumps(outcomes, protocol=pickle.HIGHEST_PROTOCOL)
        answers.write(LENGTH.pack(len(frame)) + frame)
        answers.flush()


if __name__ == "__main__":
    main()
