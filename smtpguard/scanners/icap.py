"""The ICAP scanner: each message goes to an RFC 3507 server (c-icap, Kaspersky,
Sophos, ...) as the body of an HTTP response in a RESPMOD request, over a small
pool of persistent connections."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast

from twisted.internet import error, interfaces
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpguard.envelope import Envelope
from smtpguard.interfaces import IClosable, IHealthReporting, IScanner
from smtpguard.keptpool import Kept
from smtpguard.results import ErrorKind, ScanResult, SizeLimit, Verdict
from smtpguard.scanners.deadline import with_deadline
from smtpguard.scanners.icap_protocol import (
    CRLF,
    IEOF_CHUNK,
    LAST_CHUNK,
    IcapResponse,
    ProtocolError,
    ResponseParser,
    Service,
    ServiceOptions,
    chunk,
    chunk_size_line,
    classify,
    error_kind,
    options_request,
    respmod_request,
)
from smtpguard.scanners.optional import EndpointHealth, Health, oversize
from smtpguard.spool import Message

log = Logger()

STREAM_CHUNK = 256 * 1024
POOL_SIZE = 4
KEEP_TIME = 10.0  # seconds an idle connection is kept, as for clamd; far below c-icap's KeepAliveTimeout (600 s)


class IcapError(Exception):
    """A response that refuses the request (an OPTIONS that is not 200)."""

    def __init__(self, response: IcapResponse, what: str) -> None:
        super().__init__(f"{what}: {response.describe()}")
        self.response = response


# -- one connection -------------------------------------------------------------------


@implementer(interfaces.IPullProducer)
class _BodyProducer:
    """Writes ``chunks`` in chunked coding, one per pull, then ``tail``: the
    transport asks for more only when it has sent what it had (backpressure)."""

    def __init__(self, transport: Any, chunks: Iterator[bytes], tail: bytes, cancelled: Callable[[], None]) -> None:
        self._transport = transport
        self._chunks = chunks
        self._tail = tail
        self._cancelled = cancelled
        self.done: Deferred[bool] = Deferred(self._cancel)

    def _cancel(self, done: Deferred[bool]) -> None:
        self._transport.unregisterProducer()
        self._cancelled()

    def resumeProducing(self) -> None:
        if self.done.called:
            return
        try:
            data = next(self._chunks, None)
        except Exception:
            self.finish(Failure())
            return
        if data is None:
            self._transport.write(self._tail)
            self.finish(True)
        elif data:
            self._transport.writeSequence([chunk_size_line(len(data)), data, CRLF])

    def stopProducing(self) -> None:
        self.finish(Failure(error.ConnectionLost("stopped sending the message")))

    def finish(self, outcome: bool | Failure) -> None:
        """End the stream: True when all was sent, False when interrupted."""
        if self.done.called:
            return
        self._transport.unregisterProducer()
        if isinstance(outcome, Failure):
            self.done.errback(outcome)
        else:
            self.done.callback(outcome)


class IcapConnection(Protocol):
    """One connection to the server: sends requests, parses responses in order.

    A connection goes back to the pool only when both sides are at a message
    boundary; anything else (a response before the request ended, bytes while
    idle, a protocol error) closes it.
    """

    def __init__(self) -> None:
        self._parser = ResponseParser()
        self._responses: deque[IcapResponse] = deque()
        self._waiter: Deferred[IcapResponse] | None = None
        self._producer: _BodyProducer | None = None
        self._failure: Failure | None = None
        self.in_use = False
        self.received = False  # any byte of the current exchange
        self.interrupted = False
        self.gone: Deferred[None] = Deferred()  # fires once the connection is closed
        # Told when the connection is gone (by the pool that keeps it idle).
        self.when_lost: Callable[[IcapConnection], None] | None = None

    @property
    def usable(self) -> bool:
        """Open, at a boundary, and trusted: fit for another request."""
        return (
            self._failure is None
            and not self.interrupted
            and self._parser.idle
            and not self._responses
            and self._producer is None
        )

    def connectionMade(self) -> None:
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)

    def begin(self) -> None:
        self.in_use = True
        self.received = False

    def end(self) -> None:
        self.in_use = False

    def dataReceived(self, data: bytes) -> None:
        self.received = True
        if self._failure is not None:
            return
        if not self.in_use:
            # A server has nothing to say between requests.
            self._broken(Failure(ProtocolError("data from the server between requests")))
            return
        try:
            responses = self._parser.feed(data)
        except ProtocolError:
            self._broken(Failure())
            return
        for response in responses:
            self._responses.append(response)
            if self._producer is not None:
                # The server answered before the request ended: stop sending; the
                # connection is then out of step and is not reused.
                self.interrupted = True
                self._producer.finish(False)
        self._deliver()

    def _deliver(self) -> None:
        if self._waiter is None:
            return
        waiter = self._waiter
        if self._responses:
            self._waiter = None
            waiter.callback(self._responses.popleft())
        elif self._failure is not None:
            self._waiter = None
            waiter.errback(self._failure)

    def _broken(self, failure: Failure) -> None:
        if self._failure is None:
            self._failure = failure
        self._deliver()
        if self._producer is not None:
            self._producer.finish(failure)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        if self._failure is None:
            self._failure = reason
        if self._producer is not None:
            self._producer.finish(reason)
        self._deliver()
        if self.when_lost is not None:
            self.when_lost(self)
        self.gone.callback(None)

    def send(self, data: bytes) -> None:
        if self._failure is None and self.transport is not None:
            self.transport.write(data)

    def next_response(self) -> Deferred[IcapResponse]:
        """The next response (queued or to come); cancelling aborts the connection."""
        assert self._waiter is None, "one response is awaited at a time"

        def cancel(waiter: Deferred[IcapResponse]) -> None:
            self._waiter = None
            self.abort()

        waiter: Deferred[IcapResponse] = Deferred(cancel)
        self._waiter = waiter
        self._deliver()
        return waiter

    def stream(self, chunks: Iterator[bytes], tail: bytes) -> Deferred[bool]:
        """Send ``chunks`` as chunked data, then ``tail``.  Fires True when all was
        sent, False when a response came first (the rest is not sent)."""
        if self._failure is not None:
            failed: Deferred[bool] = Deferred()
            failed.errback(self._failure)
            return failed
        if self._responses:
            self.interrupted = True
            return succeed(False)
        producer = _BodyProducer(self.transport, chunks, tail, self.abort)
        self._producer = producer

        def streamed(outcome: Any) -> Any:
            self._producer = None
            return outcome

        producer.done.addBoth(streamed)
        self.transport.registerProducer(producer, False)  # type: ignore[union-attr]
        return producer.done

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class ConnectionPool:
    """Connects to the server, and keeps up to ``size`` idle connections for the
    next requests, each for at most ``keep_time`` seconds."""

    def __init__(
        self,
        reactor: interfaces.IReactorTime,
        endpoint: interfaces.IStreamClientEndpoint,
        size: int = POOL_SIZE,
        keep_time: float = KEEP_TIME,
    ) -> None:
        self._endpoint = endpoint
        self._factory = Factory.forProtocol(IcapConnection)
        self._factory.noisy = False
        self._kept: Kept[IcapConnection] = Kept(
            reactor, size, keep_time, usable=_usable, let_go=IcapConnection.close, gone=_gone, watch=_watch
        )
        self.connections_made = 0

    @property
    def idle(self) -> int:
        return len(self._kept)

    async def acquire(self, fresh: bool = False) -> tuple[IcapConnection, bool]:
        """A connection for one exchange, and whether it was used before."""
        kept = None if fresh else self._kept.take()
        if kept is not None:
            kept.begin()
            return kept, True
        try:
            connected = await self._endpoint.connect(self._factory)
        except error.ConnectingCancelledError:
            # A deadline cancelled the attempt: say so the way every other wait does.
            raise CancelledError() from None
        connection = cast(IcapConnection, connected)
        self.connections_made += 1
        connection.begin()
        return connection, False

    def release(self, connection: IcapConnection, keep: bool) -> None:
        connection.end()
        if keep:
            self._kept.give(connection)
        else:
            connection.close()

    def discard(self, connection: IcapConnection) -> None:
        connection.end()
        connection.abort()

    def close(self) -> Deferred[None]:
        """Close the idle connections, and from now on every connection given back;
        fires once the idle ones are closed."""
        return self._kept.close()


def _usable(connection: IcapConnection) -> bool:
    return connection.usable


def _gone(connection: IcapConnection) -> Deferred[None]:
    return connection.gone


def _watch(connection: IcapConnection, told: Callable[[IcapConnection], None] | None) -> None:
    connection.when_lost = told


# -- the scanner ----------------------------------------------------------------------


def take(chunks: Iterator[bytes], size: int) -> tuple[bytes, Iterator[bytes]]:
    """The first ``size`` bytes of ``chunks``, and an iterator over the rest."""
    taken: list[bytes] = []
    have = 0
    while have < size:
        piece = next(chunks, None)
        if piece is None:
            break
        need = size - have
        if len(piece) > need:
            taken.append(piece[:need])
            return b"".join(taken), itertools.chain([piece[need:]], chunks)
        taken.append(piece)
        have += len(piece)
    return b"".join(taken), chunks


def failure_result(problem: Exception, scanner: str) -> ScanResult:
    """The scan result for an exception an exchange may end with."""
    if isinstance(problem, error.ConnectError):
        return ScanResult.failed(ErrorKind.ENGINE_NOT_READY, f"cannot connect: {problem}", scanner)
    if isinstance(problem, error.ConnectionClosed):
        return ScanResult.failed(ErrorKind.OTHER, "the ICAP server closed the connection before its answer", scanner)
    if isinstance(problem, ProtocolError):
        return ScanResult.failed(ErrorKind.OTHER, f"ICAP protocol error: {problem}", scanner)
    if isinstance(problem, IcapError):
        return ScanResult.failed(error_kind(problem.response.status), str(problem), scanner)
    return ScanResult.failed(ErrorKind.OTHER, str(problem), scanner)


@implementer(IScanner, IClosable, IHealthReporting)
class IcapScanner:
    """Scans with RESPMOD, after OPTIONS (cached for the server's Options-TTL).

    ``preview`` replaces the server's Preview size; ``use_preview=False`` sends
    every message whole without a preview.  ``timeout`` is the hard deadline of
    one scan, OPTIONS included.  Up to ``pool_size`` idle connections are kept,
    each for ``keep_time`` seconds.  A message over ``largest_message`` bytes is
    not sent: the server would not scan it.
    """

    def __init__(
        self,
        reactor: Any,
        endpoint: interfaces.IStreamClientEndpoint,
        service: Service,
        timeout: float = 60.0,
        preview: int | None = None,
        use_preview: bool = True,
        pool_size: int = POOL_SIZE,
        keep_time: float = KEEP_TIME,
        name: str = "icap",
        largest_message: int | None = None,
    ) -> None:
        self._reactor = reactor
        self._service = service
        self._timeout = timeout
        self._preview = preview
        self._use_preview = use_preview
        self._largest_message = largest_message
        self.name = name
        self.pool = ConnectionPool(reactor, endpoint, pool_size, keep_time)
        self._options: ServiceOptions | None = None
        self._expires: float | None = None
        self._waiting: list[Deferred[ServiceOptions]] = []
        self._fetching = False
        self.options_fetched = 0
        self.up = True  # whether the last exchange got an answer
        self._problem = ""

    @property
    def max_size(self) -> SizeLimit | None:
        if self._largest_message is None:
            return None
        return SizeLimit(
            self._largest_message, "max_size", "together with the ICAP service's own (c-icap: virus_scan.MaxObjectSize)"
        )

    def scan(self, message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        too_big = oversize(message.size, self.max_size, self.name)
        if too_big is not None:
            return succeed(too_big)
        scanning = Deferred.fromCoroutine(self._scan(message))
        return with_deadline(scanning, self._timeout, self._reactor, self.name)

    def close(self) -> Deferred[None]:
        """Close the idle connections; a scan in progress keeps its own until it
        ends, and then closes it."""
        return self.pool.close()

    def health(self) -> Health:
        """Up or down as the last exchange found the server."""
        problem = "" if self.up else f"{self.name}: {self._problem or 'down'}"
        return Health(self.up, (EndpointHealth(self.name, self._service.uri, self.up),), problem)

    def check(self) -> Deferred[None]:
        """Ask for OPTIONS again (one request, shared with scans waiting for it)."""
        self.invalidate()
        return self.service_options().addCallbacks(lambda _: None, lambda _: None)

    def _down(self, problem: BaseException) -> None:
        self.up = False
        self._problem = str(problem) or type(problem).__name__

    # -- OPTIONS, shared and cached

    def invalidate(self) -> None:
        """Forget the OPTIONS answer: the next scan asks again."""
        self._options = None
        self._expires = None

    def service_options(self) -> Deferred[ServiceOptions]:
        """The cached OPTIONS answer while it is fresh; else one request shared
        by every scan that waits for it."""
        now = self._reactor.seconds()
        if self._options is not None and (self._expires is None or now < self._expires):
            return succeed(self._options)

        def forget(waiter: Deferred[ServiceOptions]) -> None:
            if waiter in self._waiting:
                self._waiting.remove(waiter)

        waiter: Deferred[ServiceOptions] = Deferred(forget)
        self._waiting.append(waiter)
        if not self._fetching:
            self._fetching = True
            fetching = Deferred.fromCoroutine(self._fetch_options())
            fetching.addTimeout(self._timeout, self._reactor).addBoth(self._options_fetched)
        return waiter

    async def _fetch_options(self) -> ServiceOptions:
        async def ask(connection: IcapConnection) -> IcapResponse:
            connection.send(options_request(self._service))
            return await connection.next_response()

        response = await self._exchange(ask)
        self.options_fetched += 1
        if response.status != 200:
            raise IcapError(response, "OPTIONS")
        return ServiceOptions.from_response(response)

    def _options_fetched(self, outcome: ServiceOptions | Failure) -> None:
        self._fetching = False
        if isinstance(outcome, ServiceOptions):
            self._options = outcome
            ttl = outcome.ttl
            self._expires = None if ttl is None else self._reactor.seconds() + ttl
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    # -- one exchange on a pooled connection

    async def _exchange(self, run: Callable[[IcapConnection], Awaitable[IcapResponse]]) -> IcapResponse:
        """``run`` on a pooled connection.  A reused connection that the server had
        closed before answering anything is replaced by a new one, once."""
        for fresh in (False, True):
            try:
                connection, reused = await self.pool.acquire(fresh)
            except (error.ConnectError, CancelledError) as problem:
                self._down(problem)
                raise
            try:
                response = await run(connection)
            except error.ConnectionClosed as problem:
                self.pool.discard(connection)
                if reused and not connection.received:
                    continue
                self._down(problem)
                raise
            except BaseException as problem:
                self.pool.discard(connection)
                if isinstance(problem, ProtocolError | CancelledError):
                    self._down(problem)
                raise
            self.up = True
            self.pool.release(connection, response.keeps_connection and response.status in (200, 204))
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    # -- RESPMOD

    def _preview_size(self, options: ServiceOptions) -> int | None:
        if not self._use_preview or options.preview is None:
            return None
        return options.preview if self._preview is None else self._preview

    async def _respmod(self, connection: IcapConnection, message: Message, options: ServiceOptions) -> IcapResponse:
        chunks = message.chunks(STREAM_CHUNK)
        preview = self._preview_size(options)
        if preview is None:
            connection.send(respmod_request(self._service, None))
            await connection.stream(chunks, LAST_CHUNK)
            return await self._final(connection)
        size = min(preview, message.size)
        head, rest = take(chunks, size)
        whole = message.size <= preview
        connection.send(respmod_request(self._service, size) + chunk(head) + (IEOF_CHUNK if whole else LAST_CHUNK))
        response = await connection.next_response()
        if response.status != 100:
            return response
        if whole:
            raise ProtocolError("100 Continue after the whole message was sent (ieof)")
        await connection.stream(rest, LAST_CHUNK)
        return await self._final(connection)

    async def _final(self, connection: IcapConnection) -> IcapResponse:
        response = await connection.next_response()
        if response.status == 100:
            raise ProtocolError("100 Continue where a final response was due")
        return response

    async def _scan(self, message: Message) -> ScanResult:
        try:
            options = await self.service_options()
            if not options.supports_respmod:
                self.invalidate()
                methods = ", ".join(sorted(options.methods))
                return ScanResult.failed(ErrorKind.OTHER, f"the service offers {methods}, not RESPMOD", self.name)

            async def respmod(connection: IcapConnection) -> IcapResponse:
                return await self._respmod(connection, message, options)

            response = await self._exchange(respmod)
        except (error.ConnectError, error.ConnectionClosed, ProtocolError, IcapError) as problem:
            self.invalidate()
            result = failure_result(problem, self.name)
            log.warn("{name}: {detail}", name=self.name, detail=result.detail)
            return result
        istag = (response.headers.get("ISTag") or "").strip()
        if istag and istag != options.istag:
            # The service changed (new signatures, new configuration): ask again.
            self.invalidate()
        result = classify(response, self.name)
        if result.verdict is Verdict.ERROR:
            self.invalidate()
            log.warn("{name}: {detail}", name=self.name, detail=result.detail)
        return result
