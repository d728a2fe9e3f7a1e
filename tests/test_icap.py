"""The ICAP scanner: the pure encoder, parser and classification, the client driven
with StringTransport and Clock, the plugin's configuration, and a real c-icap
(backed by a real clamd), alone and through the proxy."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpguard import config as configuration
from smtpguard import replies, tap
from smtpguard.config import ConfigError
from smtpguard.envelope import Client, Envelope
from smtpguard.interfaces import IScanner, IScannerFactory
from smtpguard.plugins.icap import icap as icap_plugin
from smtpguard.registry import build_scanner, factories
from smtpguard.results import ErrorKind, ScanResult, SizeLimit, Threat
from smtpguard.scanners.icap import IcapConnection, IcapScanner, take
from smtpguard.scanners.icap_protocol import (
    HTTP_REQUEST,
    HTTP_RESPONSE,
    IcapResponse,
    ProtocolError,
    ResponseParser,
    Service,
    ServiceOptions,
    chunk,
    classify,
    encapsulated,
    endpoint_service,
    options_request,
    parse_encapsulated,
    parse_url,
    respmod_request,
)
from smtpguard.scanners.optional import size_limit
from smtpguard.spool import Message, Spool
from tests.conftest import SmtpSink, free_port
from tests.engines import EICAR, EICAR_SIGNATURE, Clamd
from tests.icap_engine import CIcap

ENVELOPE = Envelope(Client("192.0.2.1", 4321, helo="client.example"), "alice@example.org")
SERVICE = Service("icap://icap.test:1344/avscan", "icap.test:1344")
CLAMD_EICAR = f"{EICAR_SIGNATURE}.UNOFFICIAL"
CLEAN = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hello\r\n\r\nHello Bob.\r\n"

OPTIONS_REQUEST = (
    b"OPTIONS icap://icap.test:1344/avscan ICAP/1.0\r\n"
    b"Host: icap.test:1344\r\n"
    b"User-Agent: smtpguard\r\n"
    b"Encapsulated: null-body=0\r\n\r\n"
)
CONTINUE = b"ICAP/1.0 100 Continue\r\n\r\n"
NO_CONTENT = b'ICAP/1.0 204 Unmodified\r\nServer: C-ICAP/0.5.10\r\nConnection: keep-alive\r\nISTag: "T1"\r\n\r\n'


def message(data: bytes) -> Message:
    spool = Spool(0)
    spool.write(data)
    return spool.finish()


def response(data: bytes) -> IcapResponse:
    """The one response ``data`` holds."""
    [parsed] = ResponseParser().feed(data)
    return parsed


def options_response(
    preview: int | None = 4, ttl: int | None = 300, istag: str = "T1", methods: str = "RESPMOD, REQMOD"
) -> bytes:
    lines = [b"ICAP/1.0 200 OK", b"Methods: " + methods.encode(), b'ISTag: "' + istag.encode() + b'"']
    if preview is not None:
        lines.append(b"Preview: %d" % preview)
    if ttl is not None:
        lines.append(b"Options-TTL: %d" % ttl)
    lines += [b"Allow: 204", b"Encapsulated: null-body=0"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def virus_found(threat: str = "Eicar-Test", istag: str = "T1", body: bytes = b"<html>VIRUS FOUND</html>") -> bytes:
    """c-icap's answer for an infected object: 200 with X-Infection-Found and an
    HTTP 403 page as the new response."""
    http = b"HTTP/1.0 403 Forbidden\r\nServer: C-ICAP\r\nContent-Type: text/html\r\n\r\n"
    return (
        b"ICAP/1.0 200 OK\r\nServer: C-ICAP/0.5.10\r\nConnection: keep-alive\r\n"
        b'ISTag: "' + istag.encode() + b'"\r\n'
        b"X-Infection-Found: Type=0; Resolution=2; Threat=" + threat.encode() + b";\r\n"
        b"X-Violations-Found: 1\r\n\t-\r\n\t" + threat.encode() + b"\r\n\t0\r\n\t0\r\n"
        b"Encapsulated: res-hdr=0, res-body=%d\r\n\r\n" % len(http) + http + chunk(body) + b"0\r\n\r\n"
    )


def clean() -> ScanResult:
    return ScanResult.clean("icap")


def infected(*names: str) -> ScanResult:
    return ScanResult.infected(tuple(Threat(name) for name in names), "icap")


def failed(kind: ErrorKind, detail: str) -> ScanResult:
    return ScanResult.failed(kind, detail, "icap")


# -- 1. encoding requests (pure) ------------------------------------------------------


def test_chunk_is_hex_size_data_and_crlfs() -> None:
    """A chunk is its size in hex, CRLF, the data, CRLF."""
    assert chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"


def test_no_data_is_no_chunk() -> None:
    """Empty data writes nothing: a zero-size chunk would end the body."""
    assert chunk(b"") == b""


def test_encapsulated_offsets_are_the_lengths_of_the_sections_before() -> None:
    """Each section starts where the previous ones end; the body after the last."""
    sections = (("req-hdr", b"x" * 46), ("res-hdr", b"y" * 69))
    assert encapsulated(sections, "res-body") == "req-hdr=0, res-hdr=46, res-body=115"


def test_options_request() -> None:
    """OPTIONS names the service URI, the Host and a null body."""
    assert options_request(SERVICE) == OPTIONS_REQUEST


def test_respmod_request_with_preview() -> None:
    """RESPMOD: Allow 204, Preview, Encapsulated with the true offsets of a minimal
    GET request header and an HTTP 200 response header of type message/rfc822
    (without Content-Length: a server must read the message to learn its size)."""
    expected = (
        b"RESPMOD icap://icap.test:1344/avscan ICAP/1.0\r\n"
        b"Host: icap.test:1344\r\n"
        b"User-Agent: smtpguard\r\n"
        b"Allow: 204\r\n"
        b"Preview: 4\r\n"
        b"Encapsulated: req-hdr=0, res-hdr=46, res-body=95\r\n"
        b"\r\n"
        b"GET /message.eml HTTP/1.1\r\nHost: smtpguard\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Type: message/rfc822\r\n\r\n"
    )
    assert respmod_request(SERVICE, 4) == expected
    assert len(HTTP_REQUEST) == 46 and len(HTTP_REQUEST + HTTP_RESPONSE) == 95


def test_respmod_request_without_preview_has_no_preview_header() -> None:
    """Without a preview the Preview header is left out (not ``Preview: 0``)."""
    request = respmod_request(SERVICE, None)
    assert b"Preview" not in request
    assert request.startswith(b"RESPMOD icap://icap.test:1344/avscan ICAP/1.0\r\n")


def test_take_splits_the_first_bytes_across_chunks() -> None:
    """``take`` returns exactly the first N bytes, even across chunk boundaries,
    and the rest, starting with the remainder of the split chunk."""
    head, rest = take(iter([b"01", b"2345", b"67"]), 3)
    assert head == b"012"
    assert list(rest) == [b"345", b"67"]
    head, rest = take(iter([b"01"]), 5)
    assert (head, list(rest)) == (b"01", [])


# -- 2. parsing responses (pure) -------------------------------------------------------


def test_204_response_is_parsed() -> None:
    """Status, reason and headers of a 204 without Encapsulated."""
    parsed = response(NO_CONTENT)
    assert (parsed.version, parsed.status, parsed.reason) == ("1.0", 204, "Unmodified")
    assert parsed.headers.get("istag") == '"T1"'
    assert parsed.headers.get("Connection") == "keep-alive"
    assert parsed.keeps_connection


def test_response_fed_one_byte_at_a_time_is_the_same() -> None:
    """The parser is incremental: byte-by-byte feeding gives the same response."""
    data = virus_found()
    parser = ResponseParser()
    parsed: list[IcapResponse] = []
    for index in range(len(data)):
        parsed += parser.feed(data[index : index + 1])
    assert parsed == [response(data)]
    assert parser.idle


def test_encapsulated_http_head_is_kept_and_the_body_counted() -> None:
    """A 200's encapsulated HTTP header block is kept; its chunked body (with a
    chunk extension and a trailer) is counted, not kept."""
    http = b"HTTP/1.1 403 Forbidden\r\n\r\n"
    data = (
        b"ICAP/1.0 200 OK\r\nEncapsulated: res-hdr=0, res-body=%d\r\n\r\n" % len(http)
        + http
        + b"5;name=value\r\nhello\r\n3\r\nabc\r\n0\r\nTrailer: x\r\n\r\n"
    )
    parsed = response(data)
    assert parsed.encapsulated == (("res-hdr", 0), ("res-body", len(http)))
    assert parsed.http_head == http
    assert parsed.body_size == 8


def test_null_body_response_ends_after_its_headers() -> None:
    """``null-body=N``: N bytes of encapsulated headers and nothing after them."""
    http = b"HTTP/1.1 200 OK\r\n\r\n"
    data = b"ICAP/1.0 200 OK\r\nEncapsulated: res-hdr=0, null-body=%d\r\n\r\n" % len(http) + http
    parser = ResponseParser()
    [parsed] = parser.feed(data)
    assert parsed.http_head == http and parsed.body_size == 0
    assert parser.idle


def test_several_responses_in_one_read() -> None:
    """A 100 Continue and the final 204 arriving together are two responses."""
    assert [parsed.status for parsed in ResponseParser().feed(CONTINUE + NO_CONTENT)] == [100, 204]


def test_partial_response_leaves_the_parser_busy() -> None:
    """Until a response is complete the parser is not idle (the connection is
    not at a message boundary)."""
    parser = ResponseParser()
    assert parser.feed(NO_CONTENT[:-1]) == []
    assert not parser.idle


def test_folded_header_keeps_its_lines() -> None:
    """Continuation lines are joined with line breaks (X-Violations-Found is a list)."""
    parsed = response(b"ICAP/1.0 200 OK\r\nX-Violations-Found: 1\r\n\tfile\r\n\tName\r\n\t0\r\n\t0\r\n\r\n")
    assert parsed.headers.get("X-Violations-Found") == "1\nfile\nName\n0\n0"


def test_connection_close_is_seen() -> None:
    """``Connection: close`` means the connection ends after this response."""
    assert not response(b"ICAP/1.0 500 Server error\r\nConnection: close\r\n\r\n").keeps_connection


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"ICAP/1.0 20 OK\r\n\r\n",
        b"ICAP/1.0 204 Unmodified\r\nno colon here\r\n\r\n",
        b"ICAP/1.0 204 Unmodified\r\n continuation first\r\n\r\n",
        b"ICAP/1.0 204 Unmodified\r\nbad name: x\r\n\r\n",
    ],
)
def test_malformed_heads_are_protocol_errors(data: bytes) -> None:
    """A status line that is not ICAP's, or a header line that is not a header."""
    with pytest.raises(ProtocolError):
        ResponseParser().feed(data)


@pytest.mark.parametrize(
    "value",
    ["res-body", "res-hdr=0, res-body=x", "res-hdr=10, res-body=5", "res-body=0, res-hdr=5", "res-hdr=0", "foo=0"],
)
def test_malformed_encapsulated_headers_are_protocol_errors(value: str) -> None:
    """Missing offsets, decreasing offsets, a body that is not last, no body, an
    unknown entity."""
    with pytest.raises(ProtocolError):
        parse_encapsulated(value)


@pytest.mark.parametrize("size", [b"0x5", b"+5", b"1_0", b"zz", b"", b"1" * 17])
def test_malformed_chunk_sizes_are_protocol_errors(size: bytes) -> None:
    """Only hex digits make a chunk size (not Python's idea of an integer)."""
    head = b"ICAP/1.0 200 OK\r\nEncapsulated: res-body=0\r\n\r\n"
    with pytest.raises(ProtocolError):
        ResponseParser().feed(head + size + b"\r\nhello\r\n0\r\n\r\n")


def test_chunk_data_must_end_with_crlf() -> None:
    """A chunk longer than its size is not silently resynchronised."""
    with pytest.raises(ProtocolError):
        ResponseParser().feed(b"ICAP/1.0 200 OK\r\nEncapsulated: res-body=0\r\n\r\n2\r\nabc\r\n0\r\n\r\n")


def test_endless_head_is_a_protocol_error() -> None:
    """A head beyond the limit is refused before memory grows further."""
    with pytest.raises(ProtocolError):
        ResponseParser(max_head=100).feed(b"ICAP/1.0 200 OK\r\n" + b"X-Pad: y\r\n" * 20)


# -- 3. OPTIONS (pure) -----------------------------------------------------------------


def test_options_response_is_read() -> None:
    """Methods, Preview, Allow: 204, ISTag and Options-TTL, as c-icap sends them."""
    options = ServiceOptions.from_response(response(options_response(preview=1024, ttl=3600)))
    assert options == ServiceOptions(frozenset({"RESPMOD", "REQMOD"}), 1024, True, '"T1"', 3600)
    assert options.supports_respmod


def test_options_without_preview_or_ttl() -> None:
    """No Preview: no preview is sent; no Options-TTL: the answer never expires."""
    options = ServiceOptions.from_response(response(b"ICAP/1.0 200 OK\r\nMethods: RESPMOD\r\n\r\n"))
    assert (options.preview, options.ttl, options.allow_204, options.istag) == (None, None, False, "")


def test_a_reqmod_only_service_does_not_support_respmod() -> None:
    options = ServiceOptions.from_response(response(options_response(methods="REQMOD")))
    assert not options.supports_respmod


# -- 4. classification (pure) ----------------------------------------------------------


def test_204_is_clean() -> None:
    """204: the server saw nothing to change."""
    assert classify(response(NO_CONTENT), "icap") == clean()


def test_200_with_x_infection_found_is_infected_with_its_threat() -> None:
    """c-icap's answer: the threat name is read from X-Infection-Found."""
    assert classify(response(virus_found("Win.Test.EICAR_HDB-1")), "icap") == infected("Win.Test.EICAR_HDB-1")


def test_several_threats_in_x_infection_found() -> None:
    """Kaspersky lists several threats in one Threat field, separated by commas."""
    data = b"ICAP/1.0 200 OK\r\nX-Infection-Found: Type=0; Resolution=0; Threat=A.One, B.Two;\r\n\r\n"
    assert classify(response(data), "icap") == infected("A.One", "B.Two")


def test_200_with_x_virus_id_is_infected() -> None:
    """Sophos and others name the threat in X-Virus-ID only."""
    assert classify(response(b"ICAP/1.0 200 OK\r\nX-Virus-ID: Troj/DocDl-OYC\r\n\r\n"), "icap") == infected(
        "Troj/DocDl-OYC"
    )


@pytest.mark.parametrize("status", [b"200 OK", b"204 No Content"])
def test_kasperskys_no_threats_is_clean(status: bytes) -> None:
    """Kaspersky says ``X-Virus-ID: no threats`` on clean objects: not a threat name."""
    assert classify(response(b"ICAP/1.0 " + status + b"\r\nX-Virus-ID: No Threats\r\n\r\n"), "icap") == clean()


def test_x_violations_found_alone_names_threat_and_file() -> None:
    """Without X-Infection-Found, X-Violations-Found gives the threat and its file."""
    data = b"ICAP/1.0 200 OK\r\nX-Violations-Found: 1\r\n\teicar.com\r\n\tEICAR Test String\r\n\t0\r\n\t0\r\n\r\n"
    expected = ScanResult.infected((Threat("EICAR Test String", "eicar.com"),), "icap")
    assert classify(response(data), "icap") == expected


def test_204_naming_a_threat_is_infected() -> None:
    """A threat header wins over the status: never clean when a threat is named."""
    data = b"ICAP/1.0 204 No Content\r\nX-Infection-Found: Type=0; Resolution=2; Threat=Bad.One;\r\n\r\n"
    assert classify(response(data), "icap") == infected("Bad.One")


def test_200_without_a_threat_is_an_error_never_clean() -> None:
    """A 200 naming no threat means the server changed the message: error ``other``."""
    http = b"HTTP/1.1 200 OK\r\n\r\n"
    data = b"ICAP/1.0 200 OK\r\nEncapsulated: res-hdr=0, res-body=%d\r\n\r\n" % len(http) + http + b"0\r\n\r\n"
    assert classify(response(data), "icap") == failed(
        ErrorKind.OTHER, "ICAP 200 OK without a threat (the server changed the message)"
    )


def test_blocked_without_a_threat_name_is_an_error() -> None:
    """``X-Response-Info: blocked`` with Kaspersky's ``no threats``: blocked for some
    other reason, an error, never clean."""
    data = b"ICAP/1.0 200 OK\r\nX-Virus-ID: no threats\r\nX-Response-Info: blocked\r\n\r\n"
    assert classify(response(data), "icap") == failed(
        ErrorKind.OTHER, "the server blocked the message without naming a threat"
    )


@pytest.mark.parametrize(
    ("threat", "kind"),
    [
        ("Encrypted container violation", ErrorKind.PASSWORD_PROTECTED),
        ("Container size violation", ErrorKind.CONTENT_SIZE),
        ("Maximum nesting depth exceeded", ErrorKind.DECOMPRESS_LAYER),
        ("Corrupt archive", ErrorKind.CORRUPT_FILE),
        ("Something else", ErrorKind.OTHER),
    ],
)
def test_container_violations_are_errors_of_their_kind(threat: str, kind: ErrorKind) -> None:
    """``Type=2`` is a container the server could not look into: a scan error whose
    kind comes from its description, never clean and not a virus."""
    data = f"ICAP/1.0 200 OK\r\nX-Infection-Found: Type=2; Resolution=2; Threat={threat};\r\n\r\n".encode()
    assert classify(response(data), "icap") == failed(kind, threat)


@pytest.mark.parametrize(
    ("line", "kind", "detail"),
    [
        (b"ICAP/1.0 500 Server error", ErrorKind.OTHER, "ICAP 500 Server error"),
        (b"ICAP/1.0 503 Service overloaded", ErrorKind.TOO_MANY_REQUESTS, "ICAP 503 Service overloaded"),
        (b"ICAP/1.0 404 Service not found", ErrorKind.OTHER, "ICAP 404 Service not found"),
        (b"ICAP/1.0 408 Request timeout", ErrorKind.TIMEOUT, "ICAP 408 Request timeout"),
        (b"ICAP/1.0 400 Bad request", ErrorKind.OTHER, "ICAP 400 Bad request"),
        (b"ICAP/1.0 206 Partial Content", ErrorKind.OTHER, "ICAP 206 Partial Content"),
        (b"ICAP/1.0 100 Continue", ErrorKind.OTHER, "ICAP 100 Continue"),
    ],
)
def test_other_statuses_are_errors_with_a_kind(line: bytes, kind: ErrorKind, detail: str) -> None:
    """4xx, 5xx and anything else that is not a verdict: an error, with 503 as
    ``too-many-requests`` and 408 as ``timeout``."""
    assert classify(response(line + b"\r\nConnection: close\r\n\r\n"), "icap") == failed(kind, detail)


# -- 5. addresses and configuration ---------------------------------------------------


@pytest.mark.parametrize(
    ("url", "endpoint", "uri", "host"),
    [
        ("icap://127.0.0.1:1344/avscan", "tcp:host=127.0.0.1:port=1344", "icap://127.0.0.1:1344/avscan", None),
        ("icap://Scanner.Example/av/respmod", "tcp:host=scanner.example:port=1344", None, "scanner.example:1344"),
        ("icap://[::1]:1345/srv_clamav?allow204=on", "tcp:host=\\:\\:1:port=1345", None, "[::1]:1345"),
    ],
)
def test_urls_give_an_endpoint_and_a_service(url: str, endpoint: str, uri: str | None, host: str | None) -> None:
    """Port 1344 by default; IPv6 literals in brackets in the URI, escaped in the
    endpoint; the service path and query are kept."""
    parsed_endpoint, service = parse_url(url)
    assert parsed_endpoint == endpoint
    if uri is not None:
        assert service == Service(uri, "127.0.0.1:1344")
    if host is not None:
        assert service.host == host and service.uri == f"icap://{host}/{url.split('/', 3)[3]}"


@pytest.mark.parametrize(
    ("endpoint", "uri"),
    [
        ("tcp:127.0.0.1:1344", "icap://127.0.0.1:1344/avscan"),
        ("tcp:host=icap.example:port=11344:timeout=5", "icap://icap.example:11344/avscan"),
        ("unix:/run/c-icap/c-icap.sock", "icap://localhost/avscan"),
    ],
)
def test_endpoint_and_service_give_the_request_uri(endpoint: str, uri: str) -> None:
    assert endpoint_service(endpoint, "avscan").uri == uri


def test_plugin_is_found_by_name() -> None:
    assert factories(IScannerFactory)["icap"] is icap_plugin


def test_plugin_builds_from_a_url() -> None:
    """``url`` gives the service; timeout 60 s and the server's preview by default."""
    built = icap_plugin.build({"url": "icap://127.0.0.1:1344/avscan"}, Clock())
    assert isinstance(built, IcapScanner)
    verifyObject(IScanner, built)
    assert built.name == "icap"
    assert built._service == Service("icap://127.0.0.1:1344/avscan", "127.0.0.1:1344")
    assert (built._timeout, built._preview, built._use_preview) == (60.0, None, True)


def test_plugin_builds_from_endpoint_and_service() -> None:
    """``endpoint`` + ``service`` (``avscan`` by default); ``preview`` overrides."""
    built = icap_plugin.build({"endpoint": "tcp:127.0.0.1:1345", "timeout": 5, "preview": 0}, Clock())
    assert isinstance(built, IcapScanner)
    assert built._service.uri == "icap://127.0.0.1:1345/avscan"
    assert (built._timeout, built._preview, built._use_preview) == (5.0, 0, True)
    built = icap_plugin.build({"endpoint": "tcp:127.0.0.1:1345", "service": "srv_clamav", "preview": False}, Clock())
    assert isinstance(built, IcapScanner)
    assert built._service.uri == "icap://127.0.0.1:1345/srv_clamav" and not built._use_preview


@pytest.mark.parametrize(("config", "keep_time"), [({}, 10.0), ({"keep_time": 2.5}, 2.5)])
def test_plugin_reads_keep_time(config: dict[str, Any], keep_time: float) -> None:
    """``keep_time`` (10 s unless set) is how long an idle connection is kept."""
    clock = MemoryReactorClock()
    icap = icap_plugin.build({"url": "icap://127.0.0.1:1344/avscan", **config}, clock)
    assert isinstance(icap, IcapScanner)
    scanning = scan(icap, b"")
    [(host, port, factory, *_)] = clock.tcpClients
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(options_response())
    protocol.dataReceived(NO_CONTENT)
    assert result_of(scanning) == clean() and (host, port) == ("127.0.0.1", 1344)
    clock.advance(keep_time - 0.1)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({}, 'url: is required (e.g. "icap://127.0.0.1:1344/avscan"), or endpoint and service'),
        ({"url": "http://127.0.0.1/avscan"}, "url: expected icap://HOST:PORT/SERVICE, got 'http://127.0.0.1/avscan'"),
        ({"url": "icap://127.0.0.1:1344"}, "url: no service in 'icap://127.0.0.1:1344'"),
        ({"url": "icap://127.0.0.1:99999/a"}, "url: bad port in 'icap://127.0.0.1:99999/a'"),
        ({"url": "icap://h/a b"}, "url: the URL must be printable ASCII without spaces, got 'icap://h/a b'"),
        ({"url": "icap://h/a", "service": "b"}, "service: give either url or endpoint and service, not both"),
        ({"endpoint": "bogus:1"}, "endpoint: bad client endpoint 'bogus:1'"),
        ({"endpoint": "tcp:h:1", "service": "a\r\nX: y"}, "service: the service must be printable ASCII"),
        ({"url": "icap://h/a", "timeout": 0}, "timeout: must be greater than 0, got 0.0"),
        ({"url": "icap://h/a", "keep_time": 0}, "keep_time: must be greater than 0, got 0.0"),
        ({"url": "icap://h/a", "preview": -1}, "preview: expected a number of bytes (0 or more) or false, got -1"),
        ({"url": "icap://h/a", "preview": True}, "preview: expected a number of bytes (0 or more) or false, got True"),
        ({"url": "icap://h/a", "previews": 1}, "previews: unknown key"),
    ],
)
def test_bad_configuration_names_the_key(config: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as raised:
        icap_plugin.build(config, Clock())
    assert str(raised.value).startswith(error)


def test_max_size_is_the_largest_message_sent_to_the_server() -> None:
    """``max_size`` declares the ICAP service's limit: it is the scanner's max_size,
    a bigger message is ``content-size`` without connecting, one of exactly that
    size is sent."""
    endpoint = FakeEndpoint()
    limited = IcapScanner(Clock(), endpoint, SERVICE, largest_message=10)
    advice = "together with the ICAP service's own (c-icap: virus_scan.MaxObjectSize)"
    assert limited.max_size == SizeLimit(10, "max_size", advice)
    assert result_of(scan(limited, b"x" * 11)) == failed(ErrorKind.CONTENT_SIZE, "11 bytes, more than max_size (10)")
    assert endpoint.attempts == 0
    scan(limited, b"x" * 10)
    assert endpoint.sent() == OPTIONS_REQUEST


def test_plugin_reads_max_size() -> None:
    """``max_size`` in the table limits the scanner; 0 means no limit; below 0 is refused."""
    built = icap_plugin.build({"url": "icap://h/a", "max_size": 1000}, Clock())
    assert size_limit(built) is not None and size_limit(built).size == 1000  # type: ignore[union-attr]
    assert size_limit(icap_plugin.build({"url": "icap://h/a", "max_size": 0}, Clock())) is None
    with pytest.raises(ConfigError, match=r"^max_size: must be 0 \(no limit\) or more, got -1$"):
        icap_plugin.build({"url": "icap://h/a", "max_size": -1}, Clock())


def test_registry_builds_it_from_a_scanners_table_and_the_command_line_form() -> None:
    """``--scanner icap://...`` becomes {"type": "icap", "url": ...}: it builds."""
    built = build_scanner(tap.scanner_table("icap://127.0.0.1:1344/avscan"), Clock(), "scanners[0]")
    assert isinstance(built, IcapScanner)


# -- 6. the client over StringTransport -----------------------------------------------


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Connects a protocol to a StringTransport at once, refuses, or hangs."""

    def __init__(self, mode: str = "connect") -> None:
        self.mode = mode
        self.connections: list[tuple[IcapConnection, StringTransport]] = []
        self.attempts = 0

    def connect(self, factory: Factory) -> Deferred[Protocol]:
        self.attempts += 1
        if self.mode == "refuse":
            return defer.fail(ConnectionRefusedError())
        if self.mode == "hang":
            return Deferred()
        if self.mode == "slow":
            # What a real endpoint does when its connection attempt is cancelled.
            return Deferred(lambda attempt: attempt.errback(ConnectingCancelledError(None)))
        protocol = factory.buildProtocol(None)
        assert isinstance(protocol, IcapConnection)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return defer.succeed(protocol)

    @property
    def transport(self) -> StringTransport:
        return self.connections[-1][1]

    def answer(self, data: bytes) -> None:
        self.connections[-1][0].dataReceived(data)

    def sent(self) -> bytes:
        """What the last connection has written since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return data

    def drain(self) -> int:
        """Pull from the producer until it is done; the number of pulls."""
        pulls = 0
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
            pulls += 1
        return pulls


def scanner(endpoint: FakeEndpoint, **settings: Any) -> tuple[IcapScanner, Clock]:
    clock = Clock()
    return IcapScanner(clock, endpoint, SERVICE, **settings), clock


def result_of(scanning: Deferred[ScanResult]) -> ScanResult:
    results: list[ScanResult] = []
    scanning.addCallback(results.append)
    assert results, "the scan has not ended"
    return results[0]


def scan(icap: IcapScanner, data: bytes) -> Deferred[ScanResult]:
    return icap.scan(message(data), ENVELOPE)


def ready(**options: Any) -> tuple[IcapScanner, FakeEndpoint, Clock, Deferred[ScanResult]]:
    """A scan of b"0123456789" whose OPTIONS has been answered (preview 4)."""
    endpoint = FakeEndpoint()
    icap, clock = scanner(endpoint)
    scanning = scan(icap, b"0123456789")
    assert endpoint.sent() == OPTIONS_REQUEST
    endpoint.answer(options_response(**options))
    return icap, endpoint, clock, scanning


def test_options_first_then_respmod_with_preview_continue_and_the_rest() -> None:
    """OPTIONS; RESPMOD with the first Preview bytes ended by a zero chunk; after
    ``100 Continue`` the rest, one chunk per pull, and the last chunk; 204 is clean."""
    icap, endpoint, _, scanning = ready()
    assert endpoint.sent() == respmod_request(SERVICE, 4) + b"4\r\n0123\r\n0\r\n\r\n"
    assert endpoint.transport.producer is None

    endpoint.answer(CONTINUE)
    assert endpoint.sent() == b""
    assert endpoint.transport.producer is not None and not endpoint.transport.streaming
    endpoint.transport.producer.resumeProducing()
    assert endpoint.sent() == b"6\r\n456789\r\n"
    endpoint.transport.producer.resumeProducing()
    assert endpoint.sent() == b"0\r\n\r\n"
    assert endpoint.transport.producer is None

    assert not scanning.called
    endpoint.answer(NO_CONTENT)
    assert result_of(scanning) == clean()
    assert icap.pool.idle == 1 and not endpoint.transport.disconnecting


def test_message_within_the_preview_ends_with_ieof() -> None:
    """A message no longer than the preview is sent whole, ``Preview`` giving its
    size, and the preview ends with ``0; ieof``: no 100 Continue is awaited."""
    icap, endpoint, _, scanning = ready(preview=1024)
    assert endpoint.sent() == respmod_request(SERVICE, 10) + b"a\r\n0123456789\r\n0; ieof\r\n\r\n"
    endpoint.answer(virus_found())
    assert result_of(scanning) == infected("Eicar-Test")
    assert icap.pool.idle == 1


def test_empty_message_is_a_zero_byte_preview_with_ieof() -> None:
    endpoint = FakeEndpoint()
    icap, _ = scanner(endpoint)
    scanning = scan(icap, b"")
    endpoint.sent()
    endpoint.answer(options_response())
    assert endpoint.sent() == respmod_request(SERVICE, 0) + b"0; ieof\r\n\r\n"
    endpoint.answer(NO_CONTENT)
    assert result_of(scanning) == clean()


def test_204_after_the_preview_is_clean_and_the_rest_is_not_sent() -> None:
    """The server may decide on the preview alone: a 204 ends the exchange, and the
    connection is reused (the preview's zero chunk ended the request)."""
    icap, endpoint, _, scanning = ready()
    endpoint.sent()
    endpoint.answer(NO_CONTENT)
    assert result_of(scanning) == clean()
    assert endpoint.transport.producer is None and endpoint.sent() == b""
    assert icap.pool.idle == 1


def test_virus_found_in_the_preview_is_infected() -> None:
    _, endpoint, _, scanning = ready()
    endpoint.answer(virus_found("Found.Early"))
    assert result_of(scanning) == infected("Found.Early")


def test_100_continue_after_ieof_is_an_error_and_closes() -> None:
    """After ``ieof`` the server owes a final answer; a 100 is not understood."""
    icap, endpoint, _, scanning = ready(preview=1024)
    endpoint.answer(CONTINUE)
    assert result_of(scanning) == failed(
        ErrorKind.OTHER, "ICAP protocol error: 100 Continue after the whole message was sent (ieof)"
    )
    assert endpoint.transport.disconnected and icap.pool.idle == 0


def test_without_preview_the_message_streams_whole_one_chunk_per_pull() -> None:
    """A server that advertises no Preview gets the whole body at once, in chunks
    written only when the transport asks for them (backpressure)."""
    endpoint = FakeEndpoint()
    icap, _ = scanner(endpoint)
    big = b"a" * (256 * 1024) + b"b" * 10
    scanning = scan(icap, big)
    endpoint.sent()
    endpoint.answer(options_response(preview=None))
    assert endpoint.sent() == respmod_request(SERVICE, None)
    endpoint.transport.producer.resumeProducing()
    assert endpoint.sent() == b"40000\r\n" + b"a" * (256 * 1024) + b"\r\n"
    endpoint.transport.producer.resumeProducing()
    assert endpoint.sent() == b"a\r\nbbbbbbbbbb\r\n"
    assert endpoint.drain() == 1
    assert endpoint.sent() == b"0\r\n\r\n"
    endpoint.answer(NO_CONTENT)
    assert result_of(scanning) == clean()


def test_preview_false_never_sends_a_preview() -> None:
    endpoint = FakeEndpoint()
    icap, _ = scanner(endpoint, use_preview=False)
    scanning = scan(icap, b"0123456789")
    endpoint.sent()
    endpoint.answer(options_response(preview=1024))
    assert endpoint.sent() == respmod_request(SERVICE, None)
    endpoint.drain()
    assert endpoint.sent() == b"a\r\n0123456789\r\n0\r\n\r\n"
    endpoint.answer(NO_CONTENT)
    assert result_of(scanning) == clean()


def test_preview_setting_replaces_the_servers_size() -> None:
    endpoint = FakeEndpoint()
    icap, _ = scanner(endpoint, preview=2)
    scan(icap, b"0123456789")
    endpoint.sent()
    endpoint.answer(options_response(preview=1024))
    assert endpoint.sent() == respmod_request(SERVICE, 2) + b"2\r\n01\r\n0\r\n\r\n"


def test_answer_while_streaming_stops_sending_and_closes_the_connection() -> None:
    """A final answer before the body is all sent: it is the result, nothing more
    is sent, and the connection (mid-request) is closed, not pooled."""
    endpoint = FakeEndpoint()
    icap, _ = scanner(endpoint)
    scanning = scan(icap, b"x" * (600 * 1024))
    endpoint.sent()
    endpoint.answer(options_response(preview=None))
    endpoint.transport.producer.resumeProducing()
    endpoint.answer(b"ICAP/1.0 500 Server error\r\n\r\n")
    assert result_of(scanning) == failed(ErrorKind.OTHER, "ICAP 500 Server error")
    assert endpoint.transport.producer is None
    assert endpoint.transport.disconnecting and icap.pool.idle == 0


def test_options_are_cached_for_their_ttl_then_asked_again() -> None:
    """Options-TTL: 300 means no OPTIONS for 300 s; the first scan after that asks again.
    (The first connection was closed idle after 10 s: the second scan connects
    again, the third reuses that connection.)"""
    icap, endpoint, clock, scanning = ready(preview=1024)
    endpoint.sent()
    endpoint.answer(NO_CONTENT)
    result_of(scanning)

    clock.advance(299)
    second = scan(icap, b"again")
    assert endpoint.sent().startswith(b"RESPMOD ")
    endpoint.answer(NO_CONTENT)
    assert result_of(second) == clean()

    clock.advance(1)
    third = scan(icap, b"later")
    assert endpoint.sent() == OPTIONS_REQUEST
    endpoint.answer(options_response(preview=1024))
    assert endpoint.sent().startswith(b"RESPMOD ")
    endpoint.answer(NO_CONTENT)
    assert result_of(third) == clean()
    assert icap.options_fetched == 2 and endpoint.attempts == 2


def test_options_without_ttl_never_expire() -> None:
    icap, endpoint, clock, scanning = ready(preview=1024, ttl=None)
    endpoint.answer(NO_CONTENT)
    result_of(scanning)
    clock.advance(86400 * 365)
    scan(icap, b"next year")
    assert endpoint.sent().startswith(b"RESPMOD ")
    assert icap.options_fetched == 1


def test_a_new_istag_means_asking_for_options_again() -> None:
    """A response with another ISTag than OPTIONS gave: the service changed, so the
    next scan fetches OPTIONS again."""
    icap, endpoint, _, scanning = ready(preview=1024)
    endpoint.sent()
    endpoint.answer(NO_CONTENT.replace(b'"T1"', b'"T2"'))
    assert result_of(scanning) == clean()
    scan(icap, b"next")
    assert endpoint.sent() == OPTIONS_REQUEST


def test_an_error_answer_means_asking_for_options_again() -> None:
    icap, endpoint, _, scanning = ready(preview=1024)
    endpoint.answer(b"ICAP/1.0 500 Server error\r\nConnection: close\r\n\r\n")
    assert result_of(scanning) == failed(ErrorKind.OTHER, "ICAP 500 Server error")
    assert endpoint.transport.disconnecting and icap.pool.idle == 0
    scan(icap, b"next")
    assert endpoint.attempts == 2 and endpoint.sent() == OPTIONS_REQUEST


def test_scans_waiting_for_options_share_one_request() -> None:
    """Two scans started before OPTIONS is answered: one OPTIONS request, on one
    connection; each scan then has its own connection for RESPMOD."""
    endpoint = FakeEndpoint()
    icap, _ = scanner(endpoint)
    first, second = scan(icap, b"one"), scan(icap, b"two")
    assert endpoint.attempts == 1 and endpoint.sent() == OPTIONS_REQUEST
    endpoint.answer(options_response(preview=1024))
    assert icap.options_fetched == 1 and endpoint.attempts == 2
    for protocol, transport in endpoint.connections:
        assert transport.value().startswith(b"RESPMOD ")
        protocol.dataReceived(NO_CONTENT)
    assert result_of(first) == result_of(second) == clean()
    assert icap.pool.idle == 2


def test_connection_is_reused_for_the_next_scan() -> None:
    """ICAP/1.0 connections are persistent: the next scan uses the same one."""
    icap, endpoint, _, scanning = ready(preview=1024)
    endpoint.answer(NO_CONTENT)
    result_of(scanning)
    endpoint.sent()
    second = scan(icap, b"next")
    assert endpoint.sent().startswith(b"RESPMOD ")
    endpoint.answer(virus_found())
    assert result_of(second) == infected("Eicar-Test")
    assert endpoint.attempts == 1 and icap.pool.idle == 1


def test_connection_close_from_the_server_is_honoured() -> None:
    icap, endpoint, _, scanning = ready(preview=1024)
    endpoint.answer(NO_CONTENT.replace(b"keep-alive", b"close"))
    assert result_of(scanning) == clean()
    assert endpoint.transport.disconnecting and icap.pool.idle == 0


def test_pool_keeps_a_bounded_number_of_idle_connections() -> None:
    endpoint = FakeEndpoint()
    icap, _ = scanner(endpoint, pool_size=1)
    scanning = [scan(icap, b"one"), scan(icap, b"two")]
    endpoint.answer(options_response(preview=1024))
    for protocol, _ in endpoint.connections:
        protocol.dataReceived(NO_CONTENT)
    assert [result_of(one) for one in scanning] == [clean(), clean()]
    assert icap.pool.idle == 1
    assert [transport.disconnecting for _, transport in endpoint.connections] == [False, True]


def test_close_closes_the_idle_connections_and_fires_once_they_are_gone() -> None:
    """``close()`` closes every idle connection; its Deferred fires when they
    are lost, not before."""
    icap, endpoint, _, scanning = ready(preview=1024)
    endpoint.answer(NO_CONTENT)
    result_of(scanning)
    protocol, transport = endpoint.connections[-1]
    closing = icap.close()
    assert transport.disconnecting and icap.pool.idle == 0
    assert not closing.called
    protocol.connectionLost(Failure(ConnectionDone()))
    assert closing.called


def test_connection_given_back_after_close_is_closed_not_kept() -> None:
    """A scan that was under way when the scanner closed closes its connection
    when it ends, instead of keeping it idle."""
    icap, endpoint, _, scanning = ready(preview=1024)
    assert icap.close().called  # nothing idle yet: done at once
    endpoint.answer(NO_CONTENT)
    assert result_of(scanning) == clean()
    assert endpoint.transport.disconnecting and icap.pool.idle == 0


def test_idle_connection_is_closed_after_keep_time() -> None:
    """An idle connection is closed (not aborted) once it has waited ``keep_time``
    seconds, not a moment before; the next scan connects again."""
    endpoint = FakeEndpoint()
    icap, clock = scanner(endpoint, keep_time=5)
    scanning = scan(icap, b"0123")
    endpoint.answer(options_response(preview=1024))
    endpoint.answer(NO_CONTENT)
    assert result_of(scanning) == clean()
    clock.advance(4.9)
    assert not endpoint.transport.disconnecting and icap.pool.idle == 1
    clock.advance(0.1)
    assert endpoint.transport.disconnecting and not endpoint.transport.disconnected
    assert icap.pool.idle == 0 and clock.getDelayedCalls() == []
    endpoint.sent()
    scan(icap, b"next")
    assert endpoint.attempts == 2 and endpoint.sent().startswith(b"RESPMOD ")


def test_close_leaves_no_timer() -> None:
    """Closing the scanner stops the idle connection's timer with the connection."""
    icap, endpoint, clock, scanning = ready(preview=1024)
    endpoint.answer(NO_CONTENT)
    result_of(scanning)
    assert len(clock.getDelayedCalls()) == 1
    icap.close()
    assert clock.getDelayedCalls() == [] and endpoint.transport.disconnecting


def test_icap_scanner_sets_no_size_limit() -> None:
    """The ICAP server's limits are its own and not announced: no max_size."""
    icap, _ = scanner(FakeEndpoint())
    assert size_limit(icap) is None


def test_idle_connection_closed_by_the_server_leaves_the_pool() -> None:
    """The server's keep-alive timeout closes an idle connection: it is dropped and
    the next scan connects again."""
    icap, endpoint, _, scanning = ready(preview=1024)
    endpoint.answer(NO_CONTENT)
    result_of(scanning)
    endpoint.connections[-1][0].connectionLost(Failure(ConnectionDone()))
    assert icap.pool.idle == 0
    scan(icap, b"next")
    assert endpoint.attempts == 2


def test_data_on_an_idle_connection_closes_it() -> None:
    icap, endpoint, _, scanning = ready(preview=1024)
    endpoint.answer(NO_CONTENT)
    result_of(scanning)
    endpoint.answer(NO_CONTENT)
    assert endpoint.transport.disconnected
    endpoint.connections[-1][0].connectionLost(Failure(ConnectionLost()))
    assert icap.pool.idle == 0


def test_reused_connection_closed_before_any_answer_is_retried_on_a_new_one() -> None:
    """The server closed the pooled connection as it was picked (its keep-alive
    timeout raced the request): the scan is repeated once on a new connection."""
    icap, endpoint, _, scanning = ready(preview=1024)
    endpoint.answer(NO_CONTENT)
    result_of(scanning)
    second = scan(icap, b"0123")
    endpoint.connections[-1][0].connectionLost(Failure(ConnectionDone()))
    assert endpoint.attempts == 2
    assert endpoint.sent() == respmod_request(SERVICE, 4) + b"4\r\n0123\r\n0; ieof\r\n\r\n"
    endpoint.answer(NO_CONTENT)
    assert result_of(second) == clean()


def test_connection_lost_mid_answer_is_an_error() -> None:
    """On a new connection, or after part of an answer, a lost connection is an
    error ``other``: it is not retried and never clean."""
    _, endpoint, _, scanning = ready(preview=1024)
    endpoint.answer(NO_CONTENT[:20])
    endpoint.connections[-1][0].connectionLost(Failure(ConnectionLost()))
    assert result_of(scanning) == failed(ErrorKind.OTHER, "the ICAP server closed the connection before its answer")
    assert endpoint.attempts == 1


def test_refused_connection_is_engine_not_ready() -> None:
    icap, _ = scanner(FakeEndpoint("refuse"))
    result = result_of(scan(icap, CLEAN))
    assert (result.error, result.detail.startswith("cannot connect: Connection was refused")) == (
        ErrorKind.ENGINE_NOT_READY,
        True,
    )


def test_missing_socket_is_engine_not_ready() -> None:
    """Any failure to connect (here a unix socket that is not there) is engine-not-ready."""

    @implementer(IStreamClientEndpoint)
    class Missing:
        def connect(self, factory: Factory) -> Deferred[Protocol]:
            return defer.fail(ConnectError(osError="2: No such file or directory"))

    result = result_of(IcapScanner(Clock(), Missing(), SERVICE).scan(message(CLEAN), ENVELOPE))
    assert result.error is ErrorKind.ENGINE_NOT_READY


@pytest.mark.parametrize(
    ("answer", "kind", "detail"),
    [
        (
            b"ICAP/1.0 404 Service not found\r\nConnection: close\r\n\r\n",
            ErrorKind.OTHER,
            "OPTIONS: ICAP 404 Service not found",
        ),
        (
            b"ICAP/1.0 503 Service overloaded\r\n\r\n",
            ErrorKind.TOO_MANY_REQUESTS,
            "OPTIONS: ICAP 503 Service overloaded",
        ),
    ],
)
def test_options_refused_is_an_error(answer: bytes, kind: ErrorKind, detail: str) -> None:
    endpoint = FakeEndpoint()
    icap, _ = scanner(endpoint)
    scanning = scan(icap, CLEAN)
    endpoint.answer(answer)
    assert result_of(scanning) == failed(kind, detail)
    assert endpoint.transport.disconnecting


def test_service_without_respmod_is_an_error() -> None:
    endpoint = FakeEndpoint()
    icap, _ = scanner(endpoint)
    scanning = scan(icap, CLEAN)
    endpoint.answer(options_response(methods="REQMOD"))
    assert result_of(scanning) == failed(ErrorKind.OTHER, "the service offers REQMOD, not RESPMOD")


def test_garbage_is_a_protocol_error_and_aborts() -> None:
    icap, endpoint, _, scanning = ready(preview=1024)
    endpoint.answer(b"HTTP/1.1 200 OK\r\n\r\n")
    assert result_of(scanning) == failed(
        ErrorKind.OTHER, "ICAP protocol error: not an ICAP status line: 'HTTP/1.1 200 OK'"
    )
    assert endpoint.transport.disconnected and icap.pool.idle == 0


def test_no_answer_is_a_timeout_at_the_deadline_and_aborts() -> None:
    """The timeout is a hard deadline for the whole scan: past it the result is
    ``timeout`` and the connection is aborted."""
    _, endpoint, clock, scanning = ready(preview=1024)
    clock.advance(59.9)
    assert not scanning.called
    clock.advance(0.1)
    assert result_of(scanning) == failed(ErrorKind.TIMEOUT, "no verdict within 60 s")
    assert endpoint.transport.disconnected


def test_stalled_stream_is_a_timeout() -> None:
    """A server that stops reading the body: the deadline still ends the scan."""
    endpoint = FakeEndpoint()
    icap, clock = scanner(endpoint, timeout=5)
    scanning = scan(icap, b"x" * 1000)
    endpoint.answer(options_response(preview=None))
    clock.advance(5)
    assert result_of(scanning) == failed(ErrorKind.TIMEOUT, "no verdict within 5 s")
    assert endpoint.transport.disconnected and endpoint.transport.producer is None


def test_hanging_connect_is_a_timeout() -> None:
    icap, clock = scanner(FakeEndpoint("hang"), timeout=3)
    scanning = scan(icap, CLEAN)
    clock.advance(3)
    assert result_of(scanning) == failed(ErrorKind.TIMEOUT, "no verdict within 3 s")


def test_cancelled_connection_attempt_is_a_timeout() -> None:
    """A real endpoint fails a cancelled attempt with ConnectingCancelledError: that
    is still the deadline at work, a ``timeout``, not an ``other`` error."""
    icap, clock = scanner(FakeEndpoint("slow"), timeout=3)
    scanning = scan(icap, CLEAN)
    clock.advance(3)
    assert result_of(scanning) == failed(ErrorKind.TIMEOUT, "no verdict within 3 s")


def test_unanswered_options_time_out_for_every_waiting_scan() -> None:
    """The shared OPTIONS request has the scanner's deadline too: unanswered, it
    ends every scan waiting for it with ``timeout`` and its connection is aborted."""
    endpoint = FakeEndpoint()
    icap, clock = scanner(endpoint, timeout=3)
    first = scan(icap, CLEAN)
    clock.advance(1)
    second = scan(icap, CLEAN)
    assert endpoint.attempts == 1
    clock.advance(2)
    assert result_of(first) == result_of(second) == failed(ErrorKind.TIMEOUT, "no verdict within 3 s")
    assert endpoint.transport.disconnected


# -- 7. a real c-icap, backed by a real clamd ------------------------------------------


@pytest.fixture(scope="module")
def cicap(clamd: Clamd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CIcap]:
    """One c-icap for this module, using the session's clamd."""
    server = CIcap(tmp_path_factory.mktemp("c-icap"), clamd.socket_path)
    server.start()
    yield server
    server.kill()  # the proxy test's scanner may still hold idle connections


@pytest.fixture
def built() -> Iterator[list[IcapScanner]]:
    """Scanners a test builds on the real reactor; idle connections close at teardown."""
    scanners: list[IcapScanner] = []
    yield scanners
    close_all(scanners)


def close_all(scanners: list[IcapScanner]) -> None:
    """Close idle connections (before stopping a c-icap: its children wait for them)."""
    for one in scanners:
        one.close()


def real(built: list[IcapScanner], **config: Any) -> IcapScanner:
    made = icap_plugin.build({"timeout": 20, **config}, reactor)
    assert isinstance(made, IcapScanner)
    built.append(made)
    return made


@implementer(IStreamClientEndpoint)
class CountingEndpoint:
    """A real endpoint that counts the connections made through it (and keeps
    the protocols connected)."""

    def __init__(self, description: str) -> None:
        self._endpoint = clientFromString(reactor, description)
        self.connections = 0
        self.protocols: list[Protocol] = []

    def connect(self, factory: Factory) -> Deferred[Protocol]:
        self.connections += 1
        return self._endpoint.connect(factory).addCallback(self._connected)

    def _connected(self, protocol: Protocol) -> Protocol:
        self.protocols.append(protocol)
        return protocol


def mail(body: str = "Hello Bob.", attachment: tuple[bytes, str, str, str] | None = None) -> bytes:
    """A message as a client would send it (CRLF), with an optional attachment
    (data, maintype, subtype, filename) that the email package encodes in base64."""
    email = EmailMessage()
    email["From"] = "alice@example.org"
    email["To"] = "bob@example.net"
    email["Subject"] = "test"
    email.set_content(body)
    if attachment is not None:
        data, maintype, subtype, filename = attachment
        email.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return email.as_bytes(policy=SMTP)


def big_message(size: int, tail: bytes = b"") -> Message:
    """A file-backed message of about ``size`` bytes, ``tail`` as its last line."""
    spool = Spool(0, memory_limit=64 * 1024)
    spool.write(CLEAN)
    line = b"%07d The quick brown fox jumps over the lazy dog, again and again.\r\n"
    for index in range(size // len(line % 0)):
        spool.write(line % index)
    spool.write(tail)
    return spool.finish()


@pytest_twisted.ensureDeferred
async def test_real_options(cicap: CIcap, built: list[IcapScanner]) -> None:
    """c-icap's OPTIONS for virus_scan: RESPMOD, a 1024-byte preview, 204 allowed,
    an ISTag and an Options-TTL of an hour."""
    options = await real(built, url=cicap.url).service_options()
    assert "RESPMOD" in options.methods and options.supports_respmod
    assert (options.preview, options.allow_204, options.ttl) == (1024, True, 3600)
    assert options.istag.startswith('"CI0001-')


@pytest_twisted.ensureDeferred
async def test_real_clean_message_is_204(cicap: CIcap, built: list[IcapScanner]) -> None:
    """A small plain message (sent whole in the preview, with ieof): clean."""
    assert await real(built, url=cicap.url).scan(message(mail()), ENVELOPE) == clean()


@pytest_twisted.ensureDeferred
async def test_real_eicar_in_the_body_is_infected(cicap: CIcap, built: list[IcapScanner]) -> None:
    """EICAR in a text body: c-icap answers 200 with X-Infection-Found naming
    clamd's signature."""
    result = await real(built, url=cicap.url).scan(message(CLEAN + EICAR + b"\r\n"), ENVELOPE)
    assert result == infected(CLAMD_EICAR)


@pytest_twisted.ensureDeferred
async def test_real_eicar_as_base64_attachment_is_infected(cicap: CIcap, built: list[IcapScanner]) -> None:
    """EICAR as a base64 attachment (the raw string is nowhere in the message):
    virus_scan hands the message to clamd, which decodes the mail."""
    data = mail(attachment=(EICAR, "application", "octet-stream", "eicar.com"))
    assert EICAR not in data and b"Content-Transfer-Encoding: base64" in data
    result = await real(built, url=cicap.url).scan(message(data), ENVELOPE)
    assert result == infected(CLAMD_EICAR)


@pytest_twisted.ensureDeferred
async def test_real_big_messages_go_through_preview_and_continue(cicap: CIcap, built: list[IcapScanner]) -> None:
    """3 MB file-backed messages (preview, 100 Continue, the rest streamed): clean,
    and infected when EICAR is in the last line."""
    icap = real(built, url=cicap.url)
    assert await icap.scan(big_message(3_000_000), ENVELOPE) == clean()
    assert await icap.scan(big_message(3_000_000, EICAR + b"\r\n"), ENVELOPE) == infected(CLAMD_EICAR)


@pytest_twisted.ensureDeferred
async def test_real_message_over_the_servers_size_limit_is_an_error(
    tmp_path: Path, clamd: Clamd, built: list[IcapScanner]
) -> None:
    """virus_scan.MaxObjectSize 1M and a 2 MB message: c-icap stops scanning and
    sends the data back (a 200 naming no threat), an error ``other``, never clean.
    (Had the request declared a Content-Length, c-icap would have answered 204
    without scanning at all.)"""
    server = CIcap(tmp_path / "c-icap", clamd.socket_path, max_object_size="1M")
    await threads.deferToThread(server.start)
    try:
        icap = real(built, url=server.url)
        assert await icap.scan(big_message(500_000), ENVELOPE) == clean()
        assert await icap.scan(big_message(2_000_000), ENVELOPE) == failed(
            ErrorKind.OTHER, "ICAP 200 OK without a threat (the server changed the message)"
        )
    finally:
        close_all(built)
        await threads.deferToThread(server.stop)


@pytest_twisted.ensureDeferred
async def test_real_without_preview(cicap: CIcap, built: list[IcapScanner]) -> None:
    """``preview = false``: the whole message in one request body, same verdicts."""
    icap = real(built, url=cicap.url, preview=False)
    assert await icap.scan(big_message(500_000), ENVELOPE) == clean()
    assert await icap.scan(message(CLEAN + EICAR + b"\r\n"), ENVELOPE) == infected(CLAMD_EICAR)


@pytest_twisted.ensureDeferred
async def test_real_scans_share_one_persistent_connection(cicap: CIcap, built: list[IcapScanner]) -> None:
    """OPTIONS and two RESPMODs, one after the other, use a single TCP connection,
    and c-icap logs all three requests."""
    endpoint = CountingEndpoint(cicap.endpoint)
    _, service = parse_url(cicap.url)
    icap = IcapScanner(reactor, endpoint, service, timeout=20)
    built.append(icap)
    before = len(cicap.access_lines())

    first = await icap.scan(message(mail("first")), ENVELOPE)
    second = await icap.scan(message(CLEAN + EICAR + b"\r\n"), ENVELOPE)

    assert (first, second) == (clean(), infected(CLAMD_EICAR))
    assert endpoint.connections == 1 and icap.pool.idle == 1
    logged = await threads.deferToThread(wait_for_lines, cicap, before + 3)
    assert [line.split()[-3:] for line in logged[before:]] == [
        ["OPTIONS", "avscan", "200"],
        ["RESPMOD", "avscan", "204"],
        ["RESPMOD", "avscan", "200"],
    ]


@pytest_twisted.ensureDeferred
async def test_real_idle_connection_is_closed_after_keep_time(cicap: CIcap, built: list[IcapScanner]) -> None:
    """smtpguard closes a connection idle for ``keep_time`` (long before c-icap's
    KeepAliveTimeout of 60 s); the next scan gets its verdict over a new one."""
    endpoint = CountingEndpoint(cicap.endpoint)
    icap = IcapScanner(reactor, endpoint, parse_url(cicap.url)[1], timeout=20, keep_time=0.2)
    built.append(icap)
    assert await icap.scan(message(mail()), ENVELOPE) == clean()
    [connection] = endpoint.protocols
    assert isinstance(connection, IcapConnection) and icap.pool.idle == 1
    await connection.gone.addTimeout(10, reactor)
    assert connection.transport is not None and connection.transport.disconnecting  # closed on our side
    assert icap.pool.idle == 0
    assert await icap.scan(message(CLEAN + EICAR + b"\r\n"), ENVELOPE) == infected(CLAMD_EICAR)
    assert endpoint.connections == 2


@pytest_twisted.ensureDeferred
async def test_real_restarted_server_is_used_on_a_new_connection(
    tmp_path: Path, clamd: Clamd, built: list[IcapScanner]
) -> None:
    """c-icap dies and another starts on the same port: the pooled connection is
    dead, and the next scan gets its verdict over a new one."""
    first = CIcap(tmp_path / "first", clamd.socket_path)
    second = CIcap(tmp_path / "second", clamd.socket_path, port=first.port)
    await threads.deferToThread(first.start)
    try:
        endpoint = CountingEndpoint(first.endpoint)
        icap = IcapScanner(reactor, endpoint, parse_url(first.url)[1], timeout=20)
        built.append(icap)
        assert await icap.scan(message(mail()), ENVELOPE) == clean()
        first.kill()
        await threads.deferToThread(second.start)
        assert await icap.scan(message(CLEAN + EICAR + b"\r\n"), ENVELOPE) == infected(CLAMD_EICAR)
        assert endpoint.connections == 2
    finally:
        close_all(built)
        first.kill()
        await threads.deferToThread(second.stop)


def wait_for_lines(cicap: CIcap, count: int, timeout: float = 5.0) -> list[str]:
    import time

    deadline = time.monotonic() + timeout
    while len(lines := cicap.access_lines()) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return lines


@pytest_twisted.ensureDeferred
async def test_real_server_down_is_engine_not_ready(built: list[IcapScanner]) -> None:
    """Nothing listens on the port: connection refused, ``engine-not-ready``."""
    result = await real(built, url=f"icap://127.0.0.1:{free_port()}/avscan").scan(message(CLEAN), ENVELOPE)
    assert result.error is ErrorKind.ENGINE_NOT_READY


@pytest_twisted.ensureDeferred
async def test_real_unknown_service_is_an_error_never_clean(cicap: CIcap, built: list[IcapScanner]) -> None:
    """A service name c-icap does not know: its 404 is an error ``other``."""
    result = await real(built, url=f"icap://127.0.0.1:{cicap.port}/nosuchservice").scan(message(CLEAN), ENVELOPE)
    assert result == failed(ErrorKind.OTHER, "OPTIONS: ICAP 404 Service not found")


@pytest_twisted.ensureDeferred
async def test_real_500_when_clamd_is_down_is_an_error_never_clean(tmp_path: Path, built: list[IcapScanner]) -> None:
    """virus_scan cannot reach its clamd (PassOnError off): c-icap answers 500,
    an error ``other``, never clean; the same server works again once clamd is back."""
    engine = Clamd(tmp_path / "clamd")
    await threads.deferToThread(engine.start)
    server = CIcap(tmp_path / "c-icap", engine.socket_path)
    await threads.deferToThread(server.start)
    try:
        icap = real(built, url=server.url)
        assert await icap.scan(message(mail()), ENVELOPE) == clean()
        await threads.deferToThread(engine.stop)
        assert await icap.scan(message(mail()), ENVELOPE) == failed(ErrorKind.OTHER, "ICAP 500 Server error")
        await threads.deferToThread(engine.start)
        assert await icap.scan(message(CLEAN + EICAR + b"\r\n"), ENVELOPE) == infected(CLAMD_EICAR)
    finally:
        close_all(built)
        await threads.deferToThread(server.stop)
        await threads.deferToThread(engine.stop)


@pytest_twisted.ensureDeferred
async def test_real_dead_server_is_engine_not_ready(tmp_path: Path, clamd: Clamd, built: list[IcapScanner]) -> None:
    """c-icap dies (SIGKILL) while a connection waits in the pool: that connection
    is dropped, a new one is refused: ``engine-not-ready``, never clean."""
    server = CIcap(tmp_path / "c-icap", clamd.socket_path)
    await threads.deferToThread(server.start)
    try:
        icap = real(built, url=server.url)
        assert await icap.scan(message(mail()), ENVELOPE) == clean()
        assert icap.pool.idle == 1
        server.kill()
        result = await icap.scan(message(mail()), ENVELOPE)
        assert result.error is ErrorKind.ENGINE_NOT_READY
        assert result.detail.startswith("cannot connect: Connection was refused")
    finally:
        server.kill()


@pytest_twisted.ensureDeferred
async def test_real_stalled_clamd_is_a_timeout(tmp_path: Path, built: list[IcapScanner]) -> None:
    """clamd stopped with SIGSTOP: c-icap waits for it, and the scan ends at its
    deadline with ``timeout``."""
    engine = Clamd(tmp_path / "clamd")
    await threads.deferToThread(engine.start)
    server = CIcap(tmp_path / "c-icap", engine.socket_path)
    await threads.deferToThread(server.start)
    try:
        icap = real(built, url=server.url, timeout=2)
        await icap.service_options()
        engine.pause()
        result = await icap.scan(message(mail()), ENVELOPE)
        assert result == failed(ErrorKind.TIMEOUT, "no verdict within 2 s")
    finally:
        engine.resume()
        close_all(built)
        await threads.deferToThread(server.stop)
        await threads.deferToThread(engine.stop)


# -- 8. through the proxy --------------------------------------------------------------


@pytest.fixture
def listening() -> Iterator[list[IListeningPort]]:
    opened: list[IListeningPort] = []
    yield opened
    for port in opened:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def send(port: int, data: bytes) -> tuple[int, bytes]:
    """One message through smtplib; the reply to its end of data."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=20) as client:
        client.ehlo()
        client.mail("alice@example.org")
        client.rcpt("bob@example.net")
        try:
            return client.data(data)
        except smtplib.SMTPDataError as refused:
            return refused.smtp_code, refused.smtp_error


@pytest_twisted.ensureDeferred
async def test_proxy_rejects_eicar_attachment_and_relays_clean_mail(
    cicap: CIcap, smtp_sink: SmtpSink, listening: list[IListeningPort]
) -> None:
    """With ``[[scanners]] type = "icap"`` and ``on_virus = "reject"``, an EICAR
    attachment gets 554 5.7.1 naming clamd's signature and is not relayed; a clean
    message reaches smtp-sink marked clean by the icap scanner."""
    config = configuration.parse(
        {
            "server": {"hostname": "guard.test"},
            "upstream": {"endpoint": smtp_sink.endpoint},
            "scanners": [{"type": "icap", "url": cicap.url, "timeout": 20}],
            "policy": {"on_virus": "reject"},
        },
        "icap-test",
    )
    listener = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(tap.build_factory(config, reactor))
    listening.append(listener)
    port = listener.getHost().port
    virus = mail(attachment=(EICAR, "application", "octet-stream", "eicar.com"))

    rejected = await threads.deferToThread(send, port, virus)
    relayed = await threads.deferToThread(send, port, mail("Nothing to see here."))

    expected = replies.VIRUS_REJECTED.with_text(f"Message rejected: virus found ({CLAMD_EICAR})")
    assert rejected == (expected.code, f"{expected.enhanced} {expected.text}".encode())
    assert relayed[0] == 250
    [dump] = await threads.deferToThread(smtp_sink.messages, 1)
    assert b"X-Virus-Scanned: smtpguard (icap) on guard.test\n" in dump
    assert b"X-Virus-Status: clean\n" in dump
    assert dump.endswith(b"\nNothing to see here.\n\n")
