"""The effects a plan asks for, and the loop that drives a plan from a thread that may block.

A *plan* is a generator that holds one operation's decisions (`core`): it
yields an effect saying which call to make, and gets back its outcome, the
result sent in or the error thrown in at the `yield`. It returns the
operation's result, and hands values to its caller with `Emit` when the
operation is an iterator (`entries`, `watch`, `read_range`). A driver
performs the effects: `Drive` with grpc's blocking stubs, `AsyncDrive` with
grpc.aio. A plan never touches grpc, a thread or an event loop, so each
decision is written once and both twins make it alike.

Errors: a failed call is thrown into the plan as the `DriveError` of its
status (`errors.from_rpc_error`: `Unavailable` for UNAVAILABLE, and so on),
so a plan can catch, wait with `Sleep` and try again. Whatever else an
effect raises (an OSError of blocking work, a cancellation) is thrown in as
it is; a plan that does not catch it fails with it.
"""

from __future__ import annotations

import concurrent.futures
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from google.protobuf.message import Message

from .wire import PutMessage

T = TypeVar("T")
E = TypeVar("E")


class _Cancellable(Protocol):
    def cancel(self) -> object: ...


C = TypeVar("C", bound=_Cancellable)


class Stream(Protocol):
    """An open server stream (what `Open` answers). `cancel()` may be called from any thread, any number of times."""

    def cancel(self) -> bool: ...


@dataclass(frozen=True)
class Unary:
    """A unary call `method` (a DriveService method name, e.g. "List") with `request`: answers its reply."""

    method: str
    request: Message


@dataclass(frozen=True)
class Open:
    """Opens the server stream `method` with `request`: answers a `Stream`.

    The plan that opens a stream cancels it (in a `finally`) when done with it.
    """

    method: str
    request: Message


@dataclass(frozen=True)
class Next:
    """The next message of `stream`: answers it, or None at the end of the stream."""

    stream: Stream


@dataclass(frozen=True)
class Send:
    """A client-stream call `method` sending `messages`: answers its reply.

    Producing `messages` may block (they are read from local files): the
    driver iterates them where blocking is allowed, ahead of the sending.
    An error raised by `messages` is what the plan gets, not the CANCELLED
    status gRPC would give for it.
    """

    method: str
    messages: Iterable[PutMessage]


@dataclass(frozen=True)
class Sleep:
    """Waits `seconds`: answers None."""

    seconds: float


@dataclass(frozen=True)
class Blocking:
    """Runs `work(*args)`, which may block on local files: answers its result.

    `Drive` runs it inline; `AsyncDrive` in a worker thread, so the event
    loop stays free. With `calls=True`, `work` gets a `Caller` before
    `args`: it runs plans from that thread and from any thread `work` starts
    (how data-moving code reads the streams it writes to disk).
    """

    work: Callable[..., Any]
    args: tuple[Any, ...] = ()
    calls: bool = False


@dataclass(frozen=True)
class Emit:
    """Hands `values` to whoever iterates the plan's operation, in order: answers None."""

    values: Iterable[Any]


Call = Unary | Open | Next | Send  # the effects that talk to the daemon
Effect = Call | Sleep | Blocking | Emit
Plan = Generator[Effect, Any, T]


@dataclass(frozen=True)
class Done:
    """A plan's return value (what `advance` answers once the plan has finished)."""

    value: Any


def advance(plan: Generator[E, Any, Any], value: Any = None, error: BaseException | None = None) -> E | Done:
    """Resumes `plan` with the outcome of its last effect (`error` thrown in, else `value` sent): its next effect."""
    try:
        return plan.throw(error) if error is not None else plan.send(value)
    except StopIteration as stop:
        return Done(stop.value)


class Caller(ABC):
    """Drives plans from a thread that may block. `Drive` is one; `AsyncDrive` lends one to its worker threads.

    Subclasses perform the gRPC effects (`call`); blocking work, sleeping and
    emitting are the same for every blocking caller. Thread-safe: one caller
    serves the concurrent ranged reads of a get, and `stop` ends them all.
    """

    def __init__(self) -> None:
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # a call is started and known, or refused, never lost to `stop` between
        self._under_way: weakref.WeakSet[Any] = weakref.WeakSet()  # one nobody holds any more needs no cancel

    @abstractmethod
    def call(self, effect: Call) -> Any:
        """Performs a gRPC effect; a failed call raises the DriveError of its status."""

    def stop(self) -> None:
        """Makes the sleeps and calls of every thread using this caller, those under way and those to come,
        raise at once: how work that makes calls from several threads (a get's ranged reads) ends when
        interrupted."""
        with self._lock:
            self._stopped.set()
            for started in list(self._under_way):
                started.cancel()

    def _start(self, make: Callable[[], C]) -> C:
        """`make()`s a call (a stream, a future: anything with `cancel`) that `stop` cancels; once stopped, raises
        CancelledError instead."""
        with self._lock:
            if self._stopped.is_set():
                raise concurrent.futures.CancelledError()
            started = make()
            self._under_way.add(started)
            return started

    def _started(self, call: C) -> C:
        """Makes `call`, started elsewhere, one that `stop` cancels; cancels it at once when stopped already."""
        with self._lock:
            self._under_way.add(call)
            if self._stopped.is_set():
                call.cancel()
            return call

    def perform(self, effect: Effect) -> Any:
        if isinstance(effect, Blocking):
            return effect.work(self, *effect.args) if effect.calls else effect.work(*effect.args)
        if isinstance(effect, Sleep):
            if self._stopped.wait(effect.seconds):
                raise concurrent.futures.CancelledError()
            return None
        if isinstance(effect, Emit):
            raise TypeError("a plan run for its result emitted values: iterate it instead")
        return self.call(effect)

    def run(self, plan: Plan[T]) -> T:
        """Drives `plan` to its end; answers what it returns."""
        effect = advance(plan)
        while not isinstance(effect, Done):
            effect = self._step(plan, effect)
        return effect.value

    def iterate(self, plan: Plan[Any]) -> Iterator[Any]:
        """Drives `plan`, yielding what it emits. Closing the iterator closes the plan (its streams are cancelled)."""
        try:
            effect = advance(plan)
            while not isinstance(effect, Done):
                if isinstance(effect, Emit):
                    yield from effect.values
                    effect = advance(plan)
                else:
                    effect = self._step(plan, effect)
        finally:
            plan.close()

    def _step(self, plan: Plan[Any], effect: Effect) -> Effect | Done:
        try:
            result = self.perform(effect)
        except BaseException as err:  # the plan decides: it may catch it, and its `finally` runs either way
            return advance(plan, error=err)
        return advance(plan, result)
