"""ICAP (RFC 3507) without I/O: requests encoded, responses parsed incrementally,
and a server's answer classified into a scan result."""

from __future__ import annotations

import re
from collections.abc import Iterator
from enum import Enum
from urllib.parse import urlsplit

import attrs

from smtpguard.results import ErrorKind, ScanResult, Threat

CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
# The preview ends the message: the server must answer without a 100 Continue.
IEOF_CHUNK = b"0; ieof\r\n\r\n"
MAX_HEAD = 64 * 1024
MAX_LINE = 4096
USER_AGENT = "smtpguard"
# The message travels as the body of an HTTP response to this request.
HTTP_REQUEST = b"GET /message.eml HTTP/1.1\r\nHost: smtpguard\r\n\r\n"

_STATUS_LINE = re.compile(r"ICAP/(\d+\.\d+) (\d{3})(?: (.*))?")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_ENTITIES = ("req-hdr", "res-hdr", "req-body", "res-body", "null-body", "opt-body")
_BODIES = ("req-body", "res-body", "opt-body")
# Kaspersky names no threat this way, on clean answers.
_NO_THREATS = "no threats"


class ProtocolError(Exception):
    """The server sent something that is not a valid ICAP response."""


# -- values ---------------------------------------------------------------------------


@attrs.frozen
class Headers:
    """Header fields in order; names compare case-insensitively.  A folded value
    keeps its line breaks as ``\\n`` (X-Violations-Found is a list of lines)."""

    fields: tuple[tuple[str, str], ...] = ()

    def get_all(self, name: str) -> tuple[str, ...]:
        wanted = name.lower()
        return tuple(value for key, value in self.fields if key.lower() == wanted)

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(self.get_all(name))


@attrs.frozen
class IcapResponse:
    """One response.  The encapsulated HTTP header block is kept (it is small and
    tells what the server did); an encapsulated body is only counted."""

    version: str
    status: int
    reason: str
    headers: Headers
    encapsulated: tuple[tuple[str, int], ...] = ()
    http_head: bytes = b""
    body_size: int = 0

    @property
    def keeps_connection(self) -> bool:
        """ICAP/1.0 connections stay open unless the server says ``Connection: close``."""
        tokens = {token.strip().lower() for value in self.headers.get_all("Connection") for token in value.split(",")}
        return "close" not in tokens

    def describe(self) -> str:
        return f"ICAP {self.status} {self.reason}".rstrip()


@attrs.frozen
class Service:
    """Where requests go: the request URI (``icap://host:port/service``) and the
    value of the Host header."""

    uri: str
    host: str


@attrs.frozen
class ServiceOptions:
    """What an OPTIONS response says about the service."""

    methods: frozenset[str]
    preview: int | None
    allow_204: bool
    istag: str
    ttl: int | None

    @classmethod
    def from_response(cls, response: IcapResponse) -> ServiceOptions:
        headers = response.headers
        methods = frozenset(
            method.upper() for value in headers.get_all("Methods") for method in re.split(r"[,\s]+", value) if method
        )
        allow = {token.strip() for value in headers.get_all("Allow") for token in value.split(",")}
        return cls(
            methods=methods,
            preview=_count(headers.get("Preview")),
            allow_204="204" in allow,
            istag=(headers.get("ISTag") or "").strip(),
            ttl=_count(headers.get("Options-TTL")),
        )

    @property
    def supports_respmod(self) -> bool:
        # Methods is mandatory, but a server that leaves it out is given the benefit
        # of the doubt: its RESPMOD answer is classified like any other.
        return not self.methods or "RESPMOD" in self.methods


def _count(value: str | None) -> int | None:
    """A non-negative integer header value, or None when absent or not a number."""
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


# -- requests -------------------------------------------------------------------------


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of chunked transfer coding (nothing for no data: an
    empty chunk would end the body)."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


def chunk_size_line(size: int) -> bytes:
    return b"%x\r\n" % size


# No Content-Length: some servers skip an object that a declared length says is
# too big and answer 204 for it (c-icap's virus_scan does, past MaxObjectSize).
# Without it they must read the object to learn its size, and then refuse it.
HTTP_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: message/rfc822\r\n\r\n"


def encapsulated(sections: tuple[tuple[str, bytes], ...], body: str) -> str:
    """The Encapsulated header value: each header section's offset, then the body's."""
    parts = []
    offset = 0
    for name, data in sections:
        parts.append(f"{name}={offset}")
        offset += len(data)
    parts.append(f"{body}={offset}")
    return ", ".join(parts)


def _request(method: str, service: Service, headers: list[str]) -> bytes:
    lines = [f"{method} {service.uri} ICAP/1.0", f"Host: {service.host}", f"User-Agent: {USER_AGENT}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def options_request(service: Service) -> bytes:
    return _request("OPTIONS", service, ["Encapsulated: null-body=0"])


def respmod_request(service: Service, preview: int | None) -> bytes:
    """The RESPMOD head, up to where the chunked body starts: ICAP headers, then
    the encapsulated HTTP request and response headers.  ``preview`` is the
    number of preview bytes that follow, or None."""
    sections = (("req-hdr", HTTP_REQUEST), ("res-hdr", HTTP_RESPONSE))
    headers = ["Allow: 204"]
    if preview is not None:
        headers.append(f"Preview: {preview}")
    headers.append(f"Encapsulated: {encapsulated(sections, 'res-body')}")
    return _request("RESPMOD", service, headers) + HTTP_REQUEST + HTTP_RESPONSE


# -- responses ------------------------------------------------------------------------


def parse_head(head: bytes) -> tuple[str, int, str, Headers]:
    """Status line and header fields of a response head (without the empty line)."""
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    status = _STATUS_LINE.fullmatch(lines[0])
    if status is None:
        raise ProtocolError(f"not an ICAP status line: {lines[0][:80]!r}")
    fields: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            if not fields:
                raise ProtocolError("a continuation line before the first header")
            name, value = fields[-1]
            fields[-1] = (name, value + "\n" + line.strip())
            continue
        name, colon, value = line.partition(":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise ProtocolError(f"not a header line: {line[:80]!r}")
        fields.append((name, value.strip()))
    return status.group(1), int(status.group(2)), status.group(3) or "", Headers(tuple(fields))


def parse_encapsulated(value: str) -> tuple[tuple[str, int], ...]:
    """``res-hdr=0, res-body=161`` -> (("res-hdr", 0), ("res-body", 161)).

    The offsets must not decrease and only the last entity may be a body (or
    ``null-body``), as RFC 3507 section 4.4.1 requires.
    """
    entities: list[tuple[str, int]] = []
    for item in value.split(","):
        name, equals, offset = item.strip().partition("=")
        if not equals or name.lower() not in _ENTITIES or not offset.strip().isdigit():
            raise ProtocolError(f"bad Encapsulated header: {value[:120]!r}")
        entities.append((name.lower(), int(offset)))
    offsets = [offset for _, offset in entities]
    if offsets != sorted(offsets):
        raise ProtocolError(f"Encapsulated offsets decrease: {value[:120]!r}")
    if any(name in _BODIES or name == "null-body" for name, _ in entities[:-1]):
        raise ProtocolError(f"Encapsulated body is not last: {value[:120]!r}")
    if entities[-1][0] not in (*_BODIES, "null-body"):
        raise ProtocolError(f"Encapsulated names no body: {value[:120]!r}")
    return tuple(entities)


class _State(Enum):
    HEAD = "head"
    HTTP_HEAD = "http-head"
    CHUNK_SIZE = "chunk-size"
    CHUNK_DATA = "chunk-data"
    CHUNK_END = "chunk-end"
    TRAILER = "trailer"


class ResponseParser:
    """Bytes in, complete responses out.  Memory stays bounded: heads are limited
    to ``max_head`` bytes and encapsulated bodies are counted, not kept."""

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        self._max_head = max_head
        self._buffer = bytearray()
        self._state = _State.HEAD
        self._head: tuple[str, int, str, Headers] | None = None
        self._entities: tuple[tuple[str, int], ...] = ()
        self._http_head = b""
        self._left = 0
        self._body_size = 0

    @property
    def idle(self) -> bool:
        """Whether no part of a response is pending."""
        return self._state is _State.HEAD and not self._buffer

    def feed(self, data: bytes) -> list[IcapResponse]:
        """Take ``data``; the responses it completes.  Raises ProtocolError."""
        self._buffer += data
        responses: list[IcapResponse] = []
        while True:
            progressed, response = self._step()
            if response is not None:
                responses.append(response)
            if not progressed:
                return responses

    def _line(self) -> bytes | None:
        end = self._buffer.find(CRLF)
        if end < 0:
            if len(self._buffer) > MAX_LINE:
                raise ProtocolError("line too long in a chunked body")
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    def _step(self) -> tuple[bool, IcapResponse | None]:
        """One state transition: (whether it consumed anything, a completed response)."""
        state = self._state
        if state is _State.HEAD:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > self._max_head:
                    raise ProtocolError("response head too long")
                return False, None
            head = bytes(self._buffer[:end])
            del self._buffer[: end + 4]
            return True, self._head_received(head)
        if state is _State.HTTP_HEAD:
            if len(self._buffer) < self._left:
                return False, None
            self._http_head = bytes(self._buffer[: self._left])
            del self._buffer[: self._left]
            if self._entities[-1][0] == "null-body":
                return True, self._complete()
            self._state = _State.CHUNK_SIZE
            return True, None
        if state is _State.CHUNK_DATA:
            if not self._buffer:
                return False, None
            taken = min(self._left, len(self._buffer))
            del self._buffer[:taken]
            self._left -= taken
            self._body_size += taken
            if self._left == 0:
                self._state = _State.CHUNK_END
            return True, None
        if state is _State.CHUNK_END:
            if len(self._buffer) < 2:
                return False, None
            if self._buffer[:2] != CRLF:
                raise ProtocolError("chunk data not followed by CRLF")
            del self._buffer[:2]
            self._state = _State.CHUNK_SIZE
            return True, None
        line = self._line()
        if line is None:
            return False, None
        if state is _State.CHUNK_SIZE:
            size = line.split(b";", 1)[0].strip()
            if _CHUNK_SIZE.fullmatch(size) is None:
                raise ProtocolError(f"bad chunk size line {line[:40]!r}")
            self._left = int(size, 16)
            self._state = _State.TRAILER if self._left == 0 else _State.CHUNK_DATA
            return True, None
        # TRAILER: trailer fields are ignored up to the empty line.
        return True, (self._complete() if not line else None)

    def _head_received(self, head: bytes) -> IcapResponse | None:
        self._head = parse_head(head)
        value = self._head[3].get("Encapsulated")
        if value is None:
            return self._complete()
        self._entities = parse_encapsulated(value)
        self._left = self._entities[-1][1]
        if self._left > self._max_head:
            raise ProtocolError("encapsulated headers too long")
        self._state = _State.HTTP_HEAD
        return None

    def _complete(self) -> IcapResponse:
        assert self._head is not None
        version, status, reason, headers = self._head
        response = IcapResponse(version, status, reason, headers, self._entities, self._http_head, self._body_size)
        self._state = _State.HEAD
        self._head = None
        self._entities = ()
        self._http_head = b""
        self._body_size = 0
        return response


# -- classification -------------------------------------------------------------------


def _names(value: str) -> Iterator[str]:
    for name in value.split(","):
        name = " ".join(name.split())
        if name:
            yield name


def _infection_found(value: str) -> tuple[int | None, list[str]]:
    """``Type=0; Resolution=2; Threat=NAME;`` -> (0, ["NAME"]).  Several threats
    may be listed in Threat, separated by commas."""
    fields: dict[str, str] = {}
    for item in " ".join(value.split()).split(";"):
        key, equals, field = item.partition("=")
        if equals:
            fields[key.strip().lower()] = field.strip()
    kind = fields.get("type", "")
    return (int(kind) if kind.isdigit() else None), list(_names(fields.get("threat", "")))


def _violations_found(value: str) -> list[Threat]:
    """X-Violations-Found: a count line, then four lines per violation (file name,
    threat name, problem id, resolution)."""
    lines = [line.strip() for line in value.split("\n")]
    threats = []
    for start in range(1, len(lines) - 1, 4):
        file, name = lines[start], lines[start + 1]
        if name:
            threats.append(Threat(name, "" if file == "-" else file))
    return threats


# Type=2 in X-Infection-Found is a container violation: the server could not look
# inside.  These words in its description pick the matching error kind.
_CONTAINER_KINDS = (
    (("encrypt", "password"), ErrorKind.PASSWORD_PROTECTED),
    (("nest", "depth", "layer", "recurs"), ErrorKind.DECOMPRESS_LAYER),
    (("size", "large", "big"), ErrorKind.CONTENT_SIZE),
    (("corrupt", "damaged", "malformed"), ErrorKind.CORRUPT_FILE),
)


def container_error(description: str) -> ErrorKind:
    lowered = description.lower()
    for words, kind in _CONTAINER_KINDS:
        if any(word in lowered for word in words):
            return kind
    return ErrorKind.OTHER


def error_kind(status: int) -> ErrorKind:
    """The scan error kind of an ICAP status that is not a verdict."""
    if status == 503:
        return ErrorKind.TOO_MANY_REQUESTS
    if status == 408:
        return ErrorKind.TIMEOUT
    return ErrorKind.OTHER


def classify(response: IcapResponse, scanner: str) -> ScanResult:
    """The scan result a final RESPMOD response stands for.

    204 is clean; a 200 or 204 naming a threat (X-Infection-Found, then
    X-Violations-Found, then X-Virus-ID) is infected; anything else is an error,
    a 200 that names no threat included (the server changed the message).
    """
    headers = response.headers
    if response.status in (200, 204):
        threats: list[Threat] = []
        containers: list[str] = []
        for value in headers.get_all("X-Infection-Found"):
            kind, names = _infection_found(value)
            if kind == 2:
                containers.extend(names or ["container violation"])
            else:
                threats.extend(Threat(name) for name in names or ["unnamed threat"])
        if not threats and not containers:
            for value in headers.get_all("X-Violations-Found"):
                threats.extend(_violations_found(value))
        virus_ids = [name for value in headers.get_all("X-Virus-ID") for name in _names(value)]
        if not threats and not containers:
            threats.extend(Threat(name) for name in virus_ids if name.lower() != _NO_THREATS)
        if threats:
            return ScanResult.infected(tuple(dict.fromkeys(threats)), scanner)
        if containers:
            return ScanResult.failed(container_error(containers[0]), ", ".join(containers), scanner)
        blocked = any(value.strip().lower() == "blocked" for value in headers.get_all("X-Response-Info"))
        if blocked:
            return ScanResult.failed(ErrorKind.OTHER, "the server blocked the message without naming a threat", scanner)
        if response.status == 204:
            return ScanResult.clean(scanner)
        if any(name.lower() == _NO_THREATS for name in virus_ids):
            return ScanResult.clean(scanner)
        return ScanResult.failed(
            ErrorKind.OTHER, f"{response.describe()} without a threat (the server changed the message)", scanner
        )
    return ScanResult.failed(error_kind(response.status), response.describe(), scanner)


# -- addresses ------------------------------------------------------------------------

DEFAULT_PORT = 1344


def _check_printable(what: str, value: str) -> None:
    # These strings go verbatim into the request line and the Host header.
    if not value or any(not 0x21 <= ord(character) <= 0x7E for character in value):
        raise ValueError(f"{what} must be printable ASCII without spaces, got {value!r}")


def _authority(host: str, port: int | str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_url(url: str) -> tuple[str, Service]:
    """``icap://HOST[:PORT]/SERVICE`` -> (a client endpoint description, the Service)."""
    _check_printable("the URL", url)
    parts = urlsplit(url)
    if parts.scheme.lower() != "icap" or not parts.netloc:
        raise ValueError(f"expected icap://HOST:PORT/SERVICE, got {url!r}")
    if parts.username is not None or parts.fragment:
        raise ValueError(f"user names and fragments have no place in an ICAP URL, got {url!r}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    host = parts.hostname or ""
    service = parts.path.lstrip("/") + (f"?{parts.query}" if parts.query else "")
    if not host:
        raise ValueError(f"no host in {url!r}")
    if not service:
        raise ValueError(f"no service in {url!r} (e.g. icap://127.0.0.1:1344/avscan)")
    authority = _authority(host, port)
    endpoint = "tcp:host={}:port={}".format(host.replace(":", "\\:"), port)
    return endpoint, Service(f"icap://{authority}/{service}", authority)


def endpoint_service(endpoint: str, service: str) -> Service:
    """The Service for ``service`` at a client endpoint description: the URI names
    the endpoint's host and port when it has them (``tcp:``), else localhost."""
    _check_printable("the service", service)
    kind, _, rest = endpoint.partition(":")
    authority = "localhost"
    if kind.lower() in ("tcp", "tcp6", "ssl", "tls"):
        arguments = [argument.replace("\\:", ":") for argument in re.split(r"(?<!\\):", rest)]
        positional = [argument for argument in arguments if "=" not in argument]
        named = dict(argument.split("=", 1) for argument in arguments if "=" in argument)
        host = named.get("host", positional[0] if positional else "localhost")
        port = named.get("port", positional[1] if len(positional) > 1 else str(DEFAULT_PORT))
        authority = _authority(host, port)
    return Service(f"icap://{authority}/{service.lstrip('/')}", authority)
