"""Scans that run in threads: so many at once in all and so many for one client, each
told to stop when it is abandoned (at its deadline), and all stopped when the reactor
shuts down, so no client can hold the threads and no scan outlives the process's stop."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from smtpguard.results import ScanResult

# A job is handed its ``stopped`` poll; it returns when done or soon after the poll
# turns true.
Job = Callable[[Callable[[], bool]], ScanResult]
# Runs a job (already bound to its poll) off the reactor thread: the Deferred fires
# with its result when it has returned.
Starter = Callable[[Callable[[], ScanResult]], "Deferred[ScanResult]"]

MAX_SCANS = 4
MAX_SCANS_PER_CLIENT = 2
# How long a shutdown waits for stopped jobs to return: they poll between parts
# and chunks, which takes milliseconds.
STOP_WAIT = 1.0
# How long a scan thread with nothing to do waits for the next job before it ends.
THREAD_IDLE_TIME = 0.5


class Slots:
    """Who may start: at most ``total`` holders at once and ``per_client`` with the same
    client; the others wait in arrival order, except that a client at its own cap lets
    the ones behind it pass."""

    def __init__(self, total: int, per_client: int) -> None:
        if total < 1 or per_client < 1:
            raise ValueError("slots must be at least 1")
        self._total = total
        self._per_client = per_client
        self._held: Counter[str] = Counter()
        self.held = 0
        self._waiting: list[tuple[str, Deferred[None]]] = []

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _free_for(self, client: str) -> bool:
        return self.held < self._total and self._held[client] < self._per_client

    def _take(self, client: str) -> None:
        self._held[client] += 1
        self.held += 1

    def acquire(self, client: str) -> Deferred[None]:
        """Fires when ``client`` holds a slot; cancelling it gives up the wait."""
        if self._free_for(client):
            self._take(client)
            return defer.succeed(None)

        def withdraw(waiting: Deferred[None]) -> None:
            self._waiting.remove((client, waiting))

        waiting: Deferred[None] = Deferred(withdraw)
        self._waiting.append((client, waiting))
        return waiting

    def release(self, client: str) -> None:
        self._held[client] -= 1
        self.held -= 1
        if not self._held[client]:
            del self._held[client]
        for index, (next_client, waiting) in enumerate(self._waiting):
            if self._free_for(next_client):
                del self._waiting[index]
                self._take(next_client)
                waiting.callback(None)
                return


class Workers:
    """Runs scan jobs in threads, kept for the next jobs (``start`` replaces that: tests run a
    job at once or hold it), within ``slots``.

    Threads rather than processes: the message is already in this process (in
    memory or a spool file), the parsers do bounded work per byte and poll between
    bounded steps, and the interpreter hands the reactor thread its turn every few
    milliseconds, so the reactor keeps serving while scans run."""

    def __init__(self, reactor: Any, slots: Slots, start: Starter | None = None) -> None:
        self._reactor = reactor
        self._slots = slots
        self._start = start or self._thread
        self._stops: set[threading.Event] = set()
        self._threads = _Threads()
        self._watching = False

    def run(self, client: str, job: Job, busy: Callable[[], ScanResult]) -> Deferred[ScanResult]:
        """``job`` in a thread once ``client`` has a slot.  Cancelled while waiting for
        the slot, the Deferred fires with ``busy()``; cancelled while running, it fails
        with CancelledError at once and the job is told to stop.  The slot is freed
        when the job has returned, not before."""
        stop = threading.Event()
        admitted = self._slots.acquire(client)

        def cancel(outcome: Deferred[ScanResult]) -> None:
            stop.set()
            if not admitted.called:
                admitted.cancel()
                outcome.callback(busy())

        outcome: Deferred[ScanResult] = Deferred(cancel)

        def ended(result: ScanResult | Failure) -> None:
            self._stops.discard(stop)
            self._slots.release(client)
            if outcome.called:
                return
            if isinstance(result, Failure):
                outcome.errback(result)
            else:
                outcome.callback(result)

        def started(_: None) -> None:
            self._stops.add(stop)
            try:
                running = self._start(lambda: job(stop.is_set))
            except Exception:
                running = defer.fail()
            running.addBoth(ended)

        admitted.addCallbacks(started, lambda failure: failure.trap(CancelledError))
        return outcome

    def _thread(self, bound: Callable[[], ScanResult]) -> Deferred[ScanResult]:
        if not self._watching:
            self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)
            self._watching = True
        done: Deferred[ScanResult] = Deferred()

        def run() -> Callable[[], None]:
            try:
                result = bound()
            except BaseException:
                failure = Failure()
                return lambda: self._reactor.callFromThread(done.errback, failure)
            return lambda: self._reactor.callFromThread(done.callback, result)

        self._threads.run(run)
        return done

    def stop(self, wait: float = STOP_WAIT) -> None:
        """Tell every running job to stop, and wait up to ``wait`` seconds for their
        threads to end: run when the reactor shuts down, after the sessions' drain."""
        for stop in list(self._stops):
            stop.set()
        self._threads.stop(wait)


class _Threads:
    """Daemon threads named smtpguard-scan that run jobs one after another: a thread
    that has finished a job waits up to ``idle_time`` seconds for the next one
    before it ends, so a busy server does not start a thread per message.  A job
    returns how to report its end, which is done once its thread is free for the
    next job (so the job that the report lets start finds it free)."""

    def __init__(self, idle_time: float = THREAD_IDLE_TIME) -> None:
        self._idle_time = idle_time
        self._lock = threading.Condition()
        self._jobs: deque[Callable[[], Callable[[], None]]] = deque()
        self._idle = 0  # threads waiting for a job that no queued job is meant for
        self._stopping = False
        self.threads: set[threading.Thread] = set()

    def run(self, job: Callable[[], Callable[[], None]]) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._jobs.append(job)
                self._lock.notify()
                return
        # A daemon thread: a job stuck in one long call can never keep the process up.
        thread = threading.Thread(target=self._work, args=(job,), name="smtpguard-scan", daemon=True)
        with self._lock:
            self.threads.add(thread)
        thread.start()

    def _work(self, job: Callable[[], Callable[[], None]]) -> None:
        while True:
            report = job()
            with self._lock:
                self._idle += 1
            report()
            with self._lock:
                deadline = time.monotonic() + self._idle_time
                while not self._jobs:
                    left = deadline - time.monotonic()
                    if self._stopping or left <= 0:
                        self._idle -= 1
                        self.threads.discard(threading.current_thread())
                        return
                    self._lock.wait(left)
                job = self._jobs.popleft()

    def stop(self, wait: float) -> None:
        """Idle threads end now, the others after their job; wait up to ``wait``
        seconds for them."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            threads = list(self.threads)
        deadline = time.monotonic() + wait
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
