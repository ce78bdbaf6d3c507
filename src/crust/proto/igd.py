"""UPnP Internet Gateway Device client messages, sans-IO.

Three layers, each a pure function of bytes (or a small incremental parser):

* **SSDP** discovery: :func:`msearch_request` builds an ``M-SEARCH`` datagram,
  :func:`parse_ssdp_response` reads one answer (its ``LOCATION`` is the description URL).
* **Device description**: :func:`parse_device_description` finds the ``WANIPConnection`` or
  ``WANPPPConnection`` service and its absolute control URL.
* **SOAP** control: :func:`soap_request` builds an HTTP/1.1 POST for an action
  (:func:`add_port_mapping`, :func:`delete_port_mapping`, :func:`get_external_ip_address`,
  :func:`get_generic_port_mapping_entry`), :class:`HttpResponseParser` reads the HTTP answer
  (``Content-Length``, chunked, or up to EOF), :func:`parse_soap_response` turns its body into
  the action's output arguments or a :class:`SoapFault`.

Everything a gateway sends is untrusted: sizes are bounded (datagram, headers, body, XML
elements, depth), XML with a document type declaration (the way to entity expansion) is
refused, and every parser fed any bytes returns or raises
:class:`~crust.errors.ProtocolError`.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.parsers import expat

from crust.errors import InvalidArgument, ProtocolError

SSDP_ADDRESS = "239.255.255.250"
SSDP_PORT = 1900
#: What we search for: the gateway device (v1 and v2) and the connection services directly.
SEARCH_TARGETS = (
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
#: Connection services we can drive, most preferred first.
SERVICE_TYPES = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)

MAX_SSDP_MESSAGE = 8192
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 64
MAX_BODY = 256 * 1024
MAX_XML = 256 * 1024
MAX_XML_DEPTH = 32
MAX_XML_ELEMENTS = 4096
MAX_URL = 2048
MAX_VALUE = 4096
MAX_DESCRIPTION = 256
"""Longest port-mapping description we send (IGD allows more; short keeps requests small)."""

# UPnP error codes a client acts upon (WANIPConnection:1/2 service descriptions)
ERR_INVALID_ARGS = 402
ERR_ACTION_FAILED = 501
ERR_NO_SUCH_ENTRY = 714
ERR_INDEX_INVALID = 713
ERR_CONFLICT = 718
ERR_SAME_PORT_VALUES_REQUIRED = 724
ERR_ONLY_PERMANENT_LEASES = 725
ERR_EXTERNAL_PORT_ONLY_WILDCARD = 727
ERR_CONFLICT_WITH_OTHER_MECHANISMS = 728

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


# ============================================================================ URLs


@dataclass(frozen=True, slots=True)
class HttpUrl:
    host: str
    port: int
    path: str
    """Path and query, at least ``/``."""

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 80 else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"http://{self.netloc}{self.path}"


def parse_http_url(url: str) -> HttpUrl:
    """An ``http://`` URL whose host is an IP address (a gateway on the LAN has no name).

    Raises :class:`ProtocolError` for anything else (other schemes, host names, user info,
    bad ports, control characters).
    """
    if not isinstance(url, str) or len(url) > MAX_URL:
        raise ProtocolError("URL missing or too long")
    if any(ord(ch) < 0x21 or ord(ch) > 0x7E for ch in url):
        raise ProtocolError(f"URL with spaces or control characters: {url[:80]!r}")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        raise ProtocolError(f"bad URL {url[:80]!r}: {exc}") from exc
    if parts.scheme.lower() != "http":
        raise ProtocolError(f"not an http URL: {url[:80]!r}")
    if parts.username is not None or parts.password is not None:
        raise ProtocolError("URL with user information")
    if not host:
        raise ProtocolError(f"URL without a host: {url[:80]!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ProtocolError(f"URL host is not an IP address: {host[:80]!r}") from exc
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        raise ProtocolError("URL host with a zone id")
    if port == 0:
        raise ProtocolError("URL with port 0")
    path = parts.path or "/"
    if not path.startswith("/"):
        raise ProtocolError(f"URL path must be absolute: {path[:80]!r}")
    if parts.query:
        path += "?" + parts.query
    return HttpUrl(str(ip), port if port is not None else 80, path)


def resolve_url(base: str, reference: str) -> HttpUrl:
    """``reference`` (absolute or relative, as found in a description) against ``base``."""
    if len(reference) > MAX_URL:
        raise ProtocolError("URL too long")
    try:
        joined = urllib.parse.urljoin(base, reference.strip())
    except ValueError as exc:
        raise ProtocolError(f"cannot resolve URL {reference[:80]!r}: {exc}") from exc
    return parse_http_url(joined)


# ============================================================================ SSDP


def msearch_request(
    search_target: str, mx: int = 2, host: str = f"{SSDP_ADDRESS}:{SSDP_PORT}"
) -> bytes:
    """One SSDP ``M-SEARCH`` datagram. ``mx``: seconds devices may wait before answering."""
    if not 1 <= mx <= 5:
        raise InvalidArgument("MX must be 1..5 seconds")
    for value in (search_target, host):
        if not value or any(ch in value for ch in "\r\n") or not value.isascii():
            raise InvalidArgument(f"bad SSDP header value {value!r}")
    return (
        "M-SEARCH * HTTP/1.1\r\n"
        f"HOST: {host}\r\n"
        'MAN: "ssdp:discover"\r\n'
        f"MX: {mx}\r\n"
        f"ST: {search_target}\r\n"
        "\r\n"
    ).encode("ascii")


@dataclass(frozen=True, slots=True)
class SsdpResponse:
    location: str
    """The device description URL (``http://``, IP host)."""
    search_target: str
    usn: str
    server: str
    max_age: int | None


def _split_head(head: bytes, what: str) -> tuple[bytes, list[tuple[str, str]]]:
    """The start line and the (lower-cased name, value) header pairs of an HTTP head."""
    lines = head.split(b"\r\n")
    if not lines[0]:
        raise ProtocolError(f"{what}: empty start line")
    headers: list[tuple[str, str]] = []
    for raw in lines[1:]:
        if not raw:
            continue
        if raw[:1] in (b" ", b"\t"):
            raise ProtocolError(f"{what}: folded header lines are not allowed")
        name, sep, value = raw.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise ProtocolError(f"{what}: malformed header line {raw[:60]!r}")
        if len(headers) >= MAX_HEADERS:
            raise ProtocolError(f"{what}: more than {MAX_HEADERS} headers")
        text = value.strip(b" \t").decode("latin-1")
        if any(ord(ch) < 0x20 and ch != "\t" for ch in text) or "\x7f" in text:
            raise ProtocolError(f"{what}: control characters in header {name!r}")
        headers.append((name.decode("ascii").lower(), text))
    return lines[0], headers


def parse_ssdp_response(data: bytes) -> SsdpResponse:
    """Parse one datagram answering an ``M-SEARCH`` (``HTTP/1.1 200 OK`` + headers).

    ``NOTIFY`` announcements and anything else raise :class:`ProtocolError`.
    """
    data = bytes(data)
    if len(data) > MAX_SSDP_MESSAGE:
        raise ProtocolError(f"SSDP: datagram of {len(data)} bytes is too large")
    head, sep, _ = data.partition(b"\r\n\r\n")
    if not sep:
        # tolerate a missing final empty line (a datagram carries the whole message)
        head = data.rstrip(b"\r\n")
    start, headers = _split_head(head, "SSDP")
    parts = start.split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or parts[1] != b"200":
        raise ProtocolError(f"SSDP: not a search response: {start[:60]!r}")
    values: dict[str, str] = {}
    for name, value in headers:
        values.setdefault(name, value)
    location = values.get("location")
    if not location:
        raise ProtocolError("SSDP: response without LOCATION")
    parse_http_url(location)
    max_age: int | None = None
    match = re.search(r"max-age\s*=\s*(\d{1,9})", values.get("cache-control", ""), re.I)
    if match:
        max_age = int(match.group(1))
    return SsdpResponse(
        location=location,
        search_target=values.get("st", "")[:MAX_VALUE],
        usn=values.get("usn", "")[:MAX_VALUE],
        server=values.get("server", "")[:MAX_VALUE],
        max_age=max_age,
    )


# ============================================================================ HTTP


def http_request(
    method: str,
    url: HttpUrl,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
) -> bytes:
    """An HTTP/1.1 request (``Connection: close``; the answer is read up to its end)."""
    if not _TOKEN.match(method.encode("ascii", "replace")):
        raise InvalidArgument(f"bad HTTP method {method!r}")
    lines = [f"{method} {url.path} HTTP/1.1", f"Host: {url.netloc}"]
    for name, value in headers:
        if not _TOKEN.match(name.encode("ascii", "replace")) or any(ch in value for ch in "\r\n"):
            raise InvalidArgument(f"bad HTTP header {name!r}")
        lines.append(f"{name}: {value}")
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    lines += ["Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    reason: str
    headers: dict[str, str]
    """Lower-cased names; a repeated header keeps its first value."""
    body: bytes


class HttpResponseParser:
    """Incremental reader of one HTTP/1.x response: ``feed()`` bytes as they arrive,
    ``feed_eof()`` when the connection ends; ``done`` tells when :meth:`response` is ready.

    Bounded: the head (:data:`MAX_HEADER_BYTES`) and the body (``max_body``). Any violation
    raises :class:`ProtocolError`, and the parser stays failed.
    """

    def __init__(self, max_body: int = MAX_BODY, head_request: bool = False) -> None:
        self._max_body = max_body
        self._head_request = head_request
        self._buf = bytearray()
        self._status = 0
        self._reason = ""
        self._headers: dict[str, str] = {}
        self._state = "head"  # head, length, chunk-size, chunk-data, chunk-crlf, trailer,
        #                       eof, done, failed
        self._remaining = 0
        self._body = bytearray()
        self._eof = False

    @property
    def done(self) -> bool:
        return self._state == "done"

    def response(self) -> HttpResponse:
        if self._state != "done":
            raise ProtocolError("HTTP: response incomplete")
        return HttpResponse(self._status, self._reason, dict(self._headers), bytes(self._body))

    def feed(self, data: bytes) -> None:
        if self._state == "failed":
            raise ProtocolError("HTTP: parser already failed")
        if self._state == "done":
            return  # bytes after the end of the response are ignored (Connection: close)
        self._buf += data
        try:
            self._advance()
        except ProtocolError:
            self._state = "failed"
            raise

    def feed_eof(self) -> None:
        if self._state in ("failed", "done"):
            if self._state == "failed":
                raise ProtocolError("HTTP: parser already failed")
            return
        self._eof = True
        try:
            self._advance()
            if self._state == "eof":
                self._state = "done"
            elif self._state != "done":
                raise ProtocolError("HTTP: connection closed before the response ended")
        except ProtocolError:
            self._state = "failed"
            raise

    def _grow_body(self, chunk: bytes | bytearray) -> None:
        if len(self._body) + len(chunk) > self._max_body:
            raise ProtocolError(f"HTTP: body larger than {self._max_body} bytes")
        self._body += chunk

    def _line(self, limit: int = 1024) -> bytes | None:
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > limit:
                raise ProtocolError("HTTP: line too long")
            return None
        if end > limit:
            raise ProtocolError("HTTP: line too long")
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        return line

    def _advance(self) -> None:
        while True:
            state = self._state
            if state == "head":
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buf) > MAX_HEADER_BYTES:
                        raise ProtocolError("HTTP: head too large")
                    return
                if end > MAX_HEADER_BYTES:
                    raise ProtocolError("HTTP: head too large")
                head = bytes(self._buf[:end])
                del self._buf[: end + 4]
                self._parse_head(head)
            elif state == "length":
                take = self._buf[: self._remaining]
                self._grow_body(take)
                del self._buf[: len(take)]
                self._remaining -= len(take)
                if self._remaining == 0:
                    self._state = "done"
                    return
                if self._eof:
                    raise ProtocolError("HTTP: body shorter than its Content-Length")
                return
            elif state == "eof":
                self._grow_body(self._buf)
                self._buf.clear()
                return
            elif state == "chunk-size":
                line = self._line()
                if line is None:
                    if self._eof:
                        raise ProtocolError("HTTP: truncated chunked body")
                    return
                size_text = line.split(b";", 1)[0].strip()
                if (
                    not size_text
                    or len(size_text) > 8
                    or not re.fullmatch(rb"[0-9A-Fa-f]+", size_text)
                ):
                    raise ProtocolError(f"HTTP: bad chunk size {line[:20]!r}")
                size = int(size_text, 16)
                if len(self._body) + size > self._max_body:
                    raise ProtocolError(f"HTTP: body larger than {self._max_body} bytes")
                if size == 0:
                    self._state = "trailer"
                else:
                    self._remaining = size
                    self._state = "chunk-data"
            elif state == "chunk-data":
                take = self._buf[: self._remaining]
                self._grow_body(take)
                del self._buf[: len(take)]
                self._remaining -= len(take)
                if self._remaining:
                    if self._eof:
                        raise ProtocolError("HTTP: truncated chunk")
                    return
                self._state = "chunk-crlf"
            elif state == "chunk-crlf":
                if len(self._buf) < 2:
                    if self._eof:
                        raise ProtocolError("HTTP: truncated chunk")
                    return
                if self._buf[:2] != b"\r\n":
                    raise ProtocolError("HTTP: chunk not followed by CRLF")
                del self._buf[:2]
                self._state = "chunk-size"
            elif state == "trailer":
                line = self._line(limit=MAX_HEADER_BYTES)
                if line is None:
                    if self._eof:
                        raise ProtocolError("HTTP: truncated trailer")
                    return
                if not line:
                    self._state = "done"
                    return
            else:
                return

    def _parse_head(self, head: bytes) -> None:
        start, headers = _split_head(head, "HTTP")
        match = re.fullmatch(rb"HTTP/1\.[01] (\d{3})(?: (.*))?", start)
        if not match:
            raise ProtocolError(f"HTTP: bad status line {start[:60]!r}")
        self._status = int(match.group(1))
        self._reason = (match.group(2) or b"").decode("latin-1")[:200]
        for name, value in headers:
            self._headers.setdefault(name, value)
        if 100 <= self._status < 200:
            # an interim response (100 Continue): the real one follows
            self._headers.clear()
            self._state = "head"
            return
        te = self._headers.get("transfer-encoding", "").lower()
        length = self._headers.get("content-length")
        if self._head_request or self._status in (204, 304):
            self._state = "done"
        elif te:
            if te != "chunked":
                raise ProtocolError(f"HTTP: unsupported transfer encoding {te[:40]!r}")
            self._state = "chunk-size"
        elif length is not None:
            if not re.fullmatch(r"\d{1,10}", length):
                raise ProtocolError(f"HTTP: bad Content-Length {length[:20]!r}")
            self._remaining = int(length)
            if self._remaining > self._max_body:
                raise ProtocolError(f"HTTP: body larger than {self._max_body} bytes")
            self._state = "length" if self._remaining else "done"
        else:
            self._state = "eof"


def parse_http_response(data: bytes, max_body: int = MAX_BODY) -> HttpResponse:
    """A whole response read up to the end of the connection."""
    parser = HttpResponseParser(max_body)
    parser.feed(bytes(data))
    parser.feed_eof()
    return parser.response()


# ============================================================================ XML


@dataclass(slots=True)
class XmlElement:
    """An element of a parsed document: its local name (namespace prefix removed), its
    children and its text (concatenated character data directly inside it)."""

    name: str
    children: list[XmlElement] = field(default_factory=list)
    text: str = ""

    def child(self, name: str) -> XmlElement | None:
        for c in self.children:
            if c.name == name:
                return c
        return None

    def child_text(self, name: str) -> str | None:
        c = self.child(name)
        return None if c is None else c.text.strip()

    def iter(self, name: str) -> list[XmlElement]:
        """Every descendant (and self) called ``name``, in document order."""
        out: list[XmlElement] = []
        stack = [self]
        while stack:
            node = stack.pop()
            if node.name == name:
                out.append(node)
            stack.extend(reversed(node.children))
        return out


def _local(name: str) -> str:
    return name.rsplit(":", 1)[-1]


class _Refused(Exception):
    pass


def parse_xml(data: bytes, max_size: int = MAX_XML) -> XmlElement:
    """A small, bounded XML parser on top of expat for descriptions and SOAP bodies.

    No DTD, no entity declarations, no external entities (a document that has any is
    refused), at most :data:`MAX_XML_ELEMENTS` elements nested at most
    :data:`MAX_XML_DEPTH` deep.
    """
    data = bytes(data)
    if len(data) > max_size:
        raise ProtocolError(f"XML: document larger than {max_size} bytes")
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    root: list[XmlElement] = []
    stack: list[XmlElement] = []
    texts: list[list[str]] = []
    count = 0

    def refuse(*_: object) -> Any:
        raise _Refused("XML: document type declarations and entities are not accepted")

    def start(name: str, _attrs: dict[str, str]) -> None:
        nonlocal count
        count += 1
        if count > MAX_XML_ELEMENTS:
            raise _Refused(f"XML: more than {MAX_XML_ELEMENTS} elements")
        if len(stack) >= MAX_XML_DEPTH:
            raise _Refused(f"XML: nested deeper than {MAX_XML_DEPTH}")
        el = XmlElement(_local(name))
        if stack:
            stack[-1].children.append(el)
        elif root:
            raise _Refused("XML: more than one root element")
        else:
            root.append(el)
        stack.append(el)
        texts.append([])

    def end(_name: str) -> None:
        el = stack.pop()
        el.text = "".join(texts.pop())

    def chars(text: str) -> None:
        if texts:
            texts[-1].append(text)

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    try:
        parser.Parse(data, True)
    except _Refused as exc:
        raise ProtocolError(str(exc)) from None
    except (expat.ExpatError, ValueError, LookupError, UnicodeError) as exc:
        raise ProtocolError(f"XML: {exc}") from None
    if not root:
        raise ProtocolError("XML: no root element")
    return root[0]


# ============================================================================ description


@dataclass(frozen=True, slots=True)
class IgdService:
    service_type: str
    control_url: HttpUrl


def parse_device_description(data: bytes, location: str) -> list[IgdService]:
    """The WAN connection services of a device description, most preferred first.

    ``location`` is the URL the description was fetched from; relative control URLs are
    resolved against the description's ``URLBase`` or, without one, against ``location``.
    Raises :class:`ProtocolError` when there is no usable service.
    """
    root = parse_xml(data)
    if root.name != "root":
        raise ProtocolError(f"UPnP description: root element is {root.name[:40]!r}")
    base = root.child_text("URLBase") or location
    found: list[IgdService] = []
    for svc in root.iter("service"):
        stype = svc.child_text("serviceType") or ""
        if stype not in SERVICE_TYPES:
            continue
        control = svc.child_text("controlURL")
        if not control:
            continue
        try:
            url = resolve_url(base, control)
        except ProtocolError:
            continue
        found.append(IgdService(stype, url))
    if not found:
        raise ProtocolError("UPnP description: no WANIPConnection or WANPPPConnection service")
    found.sort(key=lambda s: SERVICE_TYPES.index(s.service_type))
    return found


# ============================================================================ SOAP

_SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
_SOAP_ENCODING = "http://schemas.xmlsoap.org/soap/encoding/"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


def _escape(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


def soap_request(
    control_url: HttpUrl, service_type: str, action: str, args: Sequence[tuple[str, str]] = ()
) -> bytes:
    """The HTTP POST invoking ``action`` of ``service_type`` with ``args`` (in order)."""
    if not _NAME.match(action) or service_type not in SERVICE_TYPES:
        raise InvalidArgument(f"bad SOAP action {service_type}#{action}")
    parts = []
    for name, value in args:
        if not _NAME.match(name):
            raise InvalidArgument(f"bad SOAP argument name {name!r}")
        if any(ord(ch) < 0x20 and ch not in "\t\n\r" for ch in value):
            raise InvalidArgument(f"control characters in SOAP argument {name}")
        parts.append(f"<{name}>{_escape(value)}</{name}>")
    body = (
        '<?xml version="1.0"?>\r\n'
        f'<s:Envelope xmlns:s="{_SOAP_NS}" s:encodingStyle="{_SOAP_ENCODING}">'
        f'<s:Body><u:{action} xmlns:u="{service_type}">'
        + "".join(parts)
        + f"</u:{action}></s:Body></s:Envelope>\r\n"
    ).encode("utf-8")
    headers = [
        ("Content-Type", 'text/xml; charset="utf-8"'),
        ("SOAPAction", f'"{service_type}#{action}"'),
    ]
    return http_request("POST", control_url, headers, body)


@dataclass(frozen=True, slots=True)
class SoapFault:
    """A UPnP error answer (HTTP 500 with a SOAP Fault)."""

    code: int | None
    """The ``UPnPError/errorCode``: 718 conflict, 725 only permanent leases, ..."""
    description: str


@dataclass(frozen=True, slots=True)
class SoapResult:
    action: str
    values: dict[str, str]
    """The output arguments by name."""


def parse_soap_response(status: int, body: bytes, action: str) -> SoapResult | SoapFault:
    """The outcome of a SOAP call: the action's output arguments, or a fault.

    Raises :class:`ProtocolError` when the body is neither (or the status is neither 200
    nor a 500 carrying a fault).
    """
    if status not in (200, 500):
        raise ProtocolError(f"SOAP: HTTP status {status}")
    root = parse_xml(body)
    if root.name != "Envelope":
        raise ProtocolError(f"SOAP: root element is {root.name[:40]!r}, not Envelope")
    soap_body = root.child("Body")
    if soap_body is None or not soap_body.children:
        raise ProtocolError("SOAP: no Body")
    first = soap_body.children[0]
    if first.name == "Fault":
        code_text = None
        for el in first.iter("errorCode"):
            code_text = el.text.strip()
            break
        desc = ""
        for el in first.iter("errorDescription"):
            desc = el.text.strip()[:MAX_VALUE]
            break
        code: int | None = None
        if code_text is not None:
            if not re.fullmatch(r"-?\d{1,9}", code_text):
                raise ProtocolError(f"SOAP: bad errorCode {code_text[:20]!r}")
            code = int(code_text)
        if not desc:
            desc = first.child_text("faultstring") or "UPnP error"
        return SoapFault(code, desc[:MAX_VALUE])
    if status != 200:
        raise ProtocolError(f"SOAP: HTTP status {status} without a fault")
    if first.name != action + "Response":
        raise ProtocolError(f"SOAP: answer {first.name[:40]!r} to {action}")
    values: dict[str, str] = {}
    for arg in first.children:
        if len(values) >= 64:
            raise ProtocolError("SOAP: too many output arguments")
        values.setdefault(arg.name, arg.text.strip()[:MAX_VALUE])
    return SoapResult(action, values)


# ---- actions --------------------------------------------------------------------------------


def _proto(protocol: str) -> str:
    if protocol.lower() not in ("tcp", "udp"):
        raise InvalidArgument(f"protocol must be 'tcp' or 'udp', not {protocol!r}")
    return protocol.upper()


def _port(name: str, port: int, zero_ok: bool = False) -> str:
    if isinstance(port, bool) or not isinstance(port, int):
        raise InvalidArgument(f"{name} must be an integer")
    if not (0 if zero_ok else 1) <= port <= 65535:
        raise InvalidArgument(f"{name} out of range: {port}")
    return str(port)


def add_port_mapping(
    control_url: HttpUrl,
    service_type: str,
    *,
    external_port: int,
    protocol: str,
    internal_port: int,
    internal_client: str,
    description: str,
    lease_duration: int,
    remote_host: str = "",
) -> bytes:
    """``AddPortMapping``: forward ``external_port`` to ``internal_client:internal_port``.
    ``lease_duration`` 0 asks for a permanent mapping (the only kind some IGDv1 offer)."""
    if not 0 <= lease_duration <= 0xFFFFFFFF:
        raise InvalidArgument(f"lease_duration out of range: {lease_duration}")
    try:
        ipaddress.IPv4Address(internal_client)
    except ValueError as exc:
        raise InvalidArgument(f"internal_client must be an IPv4 address: {exc}") from exc
    return soap_request(
        control_url,
        service_type,
        "AddPortMapping",
        [
            ("NewRemoteHost", remote_host),
            ("NewExternalPort", _port("external_port", external_port)),
            ("NewProtocol", _proto(protocol)),
            ("NewInternalPort", _port("internal_port", internal_port)),
            ("NewInternalClient", internal_client),
            ("NewEnabled", "1"),
            ("NewPortMappingDescription", description[:MAX_DESCRIPTION]),
            ("NewLeaseDuration", str(lease_duration)),
        ],
    )


def delete_port_mapping(
    control_url: HttpUrl,
    service_type: str,
    *,
    external_port: int,
    protocol: str,
    remote_host: str = "",
) -> bytes:
    return soap_request(
        control_url,
        service_type,
        "DeletePortMapping",
        [
            ("NewRemoteHost", remote_host),
            ("NewExternalPort", _port("external_port", external_port)),
            ("NewProtocol", _proto(protocol)),
        ],
    )


def get_external_ip_address(control_url: HttpUrl, service_type: str) -> bytes:
    return soap_request(control_url, service_type, "GetExternalIPAddress")


def get_generic_port_mapping_entry(control_url: HttpUrl, service_type: str, index: int) -> bytes:
    if not 0 <= index <= 0xFFFF:
        raise InvalidArgument(f"index out of range: {index}")
    return soap_request(
        control_url,
        service_type,
        "GetGenericPortMappingEntry",
        [("NewPortMappingIndex", str(index))],
    )


def external_ip_from(result: SoapResult) -> str:
    """The ``NewExternalIPAddress`` of a ``GetExternalIPAddress`` result (IPv4)."""
    text = result.values.get("NewExternalIPAddress", "")
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError as exc:
        raise ProtocolError(f"UPnP: external address {text[:40]!r} is not IPv4") from exc


@dataclass(frozen=True, slots=True)
class PortMappingEntry:
    remote_host: str
    external_port: int
    protocol: str
    """``"tcp"`` or ``"udp"``."""
    internal_port: int
    internal_client: str
    enabled: bool
    description: str
    lease_duration: int


def _int_value(values: dict[str, str], name: str, lo: int, hi: int) -> int:
    text = values.get(name, "")
    if not re.fullmatch(r"\d{1,10}", text) or not lo <= int(text) <= hi:
        raise ProtocolError(f"UPnP: bad {name} {text[:20]!r}")
    return int(text)


def port_mapping_entry_from(result: SoapResult) -> PortMappingEntry:
    """A ``GetGenericPortMappingEntry`` (or ``GetSpecificPortMappingEntry``) result."""
    v = result.values
    protocol = v.get("NewProtocol", "").lower()
    if protocol not in ("tcp", "udp"):
        raise ProtocolError(f"UPnP: bad NewProtocol {protocol[:20]!r}")
    enabled = v.get("NewEnabled", "1").strip().lower() in ("1", "true", "yes")
    return PortMappingEntry(
        remote_host=v.get("NewRemoteHost", ""),
        external_port=_int_value(v, "NewExternalPort", 0, 65535),
        protocol=protocol,
        internal_port=_int_value(v, "NewInternalPort", 1, 65535),
        internal_client=v.get("NewInternalClient", ""),
        enabled=enabled,
        description=v.get("NewPortMappingDescription", ""),
        lease_duration=_int_value(v, "NewLeaseDuration", 0, 0xFFFFFFFF),
    )
