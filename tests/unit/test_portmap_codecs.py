"""NAT-PMP, PCP and UPnP IGD codecs (crust.proto.natpmp / pcp / igd): layouts, parsing,
bounds, and Hypothesis: any bytes give a result or ProtocolError, nothing else."""

from __future__ import annotations

import contextlib
import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crust.errors import InvalidArgument, ProtocolError
from crust.proto import igd, natpmp, pcp

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# =============================================================================== NAT-PMP


def test_natpmp_requests_layout() -> None:
    assert natpmp.external_address_request() == b"\x00\x00"
    req = natpmp.map_request("udp", 4000, 4001, 7200)
    assert req == struct.pack("!BBHHHI", 0, 1, 0, 4000, 4001, 7200)
    assert natpmp.map_request("tcp", 80, 0, 0)[1] == 2
    # deletion of all mappings of a protocol: internal port 0 with lifetime 0
    assert natpmp.map_request("tcp", 0, 0, 0) == struct.pack("!BBHHHI", 0, 2, 0, 0, 0, 0)


@pytest.mark.parametrize(
    "args",
    [
        ("sctp", 1, 1, 1),
        ("udp", 0, 1, 10),
        ("udp", 70000, 1, 1),
        ("udp", 1, -1, 1),
        ("udp", 1, 1, -1),
        ("udp", 1, 1, 1 << 32),
        ("udp", True, 1, 1),
    ],
)
def test_natpmp_bad_request_values(args: tuple[str, int, int, int]) -> None:
    with pytest.raises(InvalidArgument):
        natpmp.map_request(*args)


def test_natpmp_parse_external_address() -> None:
    data = struct.pack("!BBHI", 0, 128, 0, 1234) + bytes([198, 18, 0, 10])
    r = natpmp.parse_response(data)
    assert r == natpmp.ExternalAddressResponse(0, 1234, "198.18.0.10")


def test_natpmp_parse_map() -> None:
    data = struct.pack("!BBHIHHI", 0, 129, 0, 99, 4000, 4444, 3600)
    r = natpmp.parse_response(data)
    assert r == natpmp.MapResponse(0, 99, "udp", 4000, 4444, 3600)
    r = natpmp.parse_response(struct.pack("!BBHIHHI", 0, 130, 0, 99, 4000, 0, 0))
    assert isinstance(r, natpmp.MapResponse) and r.protocol == "tcp" and r.lifetime == 0


def test_natpmp_short_error_responses_are_accepted() -> None:
    # RFC 6886 §3.5: with a non-zero result the other fields are undefined
    r = natpmp.parse_response(struct.pack("!BBHI", 0, 130, 2, 7))
    assert isinstance(r, natpmp.MapResponse)
    assert r.result == natpmp.ResultCode.NOT_AUTHORIZED and r.epoch == 7
    r2 = natpmp.parse_response(struct.pack("!BBH", 0, 128, 3))
    assert r2.result == natpmp.ResultCode.NETWORK_FAILURE
    assert natpmp.result_name(3) == "NETWORK_FAILURE" and natpmp.result_name(99) == "result 99"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x80\x00",
        struct.pack("!BBHI", 2, 128, 0, 0) + bytes(4),  # a PCP version
        struct.pack("!BBHI", 0, 0, 0, 0) + bytes(4),  # a request
        struct.pack("!BBHI", 0, 128 + 7, 0, 0) + bytes(8),  # unknown opcode
        struct.pack("!BBHI", 0, 128 + 7, 5, 0),  # "unsupported opcode" for an op we never send
        struct.pack("!BBHIHH", 0, 129, 0, 1, 4000, 4000),  # truncated success
        struct.pack("!BBHIHHI", 0, 129, 0, 1, 4000, 0, 60),  # granted with port 0
        bytes(2000),
    ],
)
def test_natpmp_rejects(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        natpmp.parse_response(data)


def test_natpmp_epoch_check() -> None:
    lost = natpmp.epoch_lost_state
    assert not lost(100, 10.0, 110, 20.0)  # in step
    assert not lost(100, 10.0, 100, 10.5)  # same second
    assert lost(100, 10.0, 5, 20.0)  # went back: rebooted
    assert lost(100, 10.0, 101, 110.0)  # server clock stood still while ours ran 100 s
    assert lost(100, 10.0, 500, 20.0)  # server ran far ahead
    assert not lost(1000, 0.0, 1000 + 3600 - 200, 3600.0)  # drift within 1/16


def test_retransmit_delays() -> None:
    assert natpmp.retransmit_delays(0.25, 4) == [0.25, 0.5, 1.0, 2.0]
    with pytest.raises(InvalidArgument):
        natpmp.retransmit_delays(0.25, 0)


@FUZZ
@given(st.binary(max_size=64))
def test_natpmp_fuzz(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        natpmp.parse_response(data)


@FUZZ
@given(
    st.integers(0, 5),
    st.integers(0, 2),
    st.integers(0, 2**32 - 1),
    st.integers(1, 65535),
    st.integers(1, 65535),
    st.integers(0, 2**32 - 1),
)
def test_natpmp_map_response_roundtrip(
    result: int, op: int, epoch: int, internal: int, external: int, lifetime: int
) -> None:
    if op == 0:
        data = struct.pack("!BBHI", 0, 128, result, epoch) + bytes([1, 2, 3, 4])
        r = natpmp.parse_response(data)
        assert r == natpmp.ExternalAddressResponse(result, epoch, "1.2.3.4")
        return
    data = struct.pack("!BBHIHHI", 0, 128 + op, result, epoch, internal, external, lifetime)
    m = natpmp.parse_response(data)
    assert isinstance(m, natpmp.MapResponse)
    assert (m.result, m.epoch, m.internal_port, m.external_port, m.lifetime) == (
        result,
        epoch,
        internal,
        external,
        lifetime,
    )
    assert m.protocol == ("udp" if op == 1 else "tcp")


# =============================================================================== PCP

NONCE = bytes(range(1, 13))


def pcp_response(
    result: int = 0,
    lifetime: int = 7200,
    epoch: int = 5,
    *,
    opcode: int = 1,
    nonce: bytes = NONCE,
    proto: int = 6,
    internal: int = 4000,
    external: int = 4000,
    address: str = "198.18.0.10",
    options: bytes = b"",
    version: int = 2,
) -> bytes:
    head = struct.pack("!BBBBII", version, 0x80 | opcode, 0, result, lifetime, epoch) + bytes(12)
    if opcode != 1:
        return head + options
    body = nonce + struct.pack("!B3xHH", proto, internal, external)
    return head + body + pcp.address_to_bytes(address) + options


def test_pcp_addresses() -> None:
    assert pcp.address_to_bytes("10.1.0.2") == bytes(10) + b"\xff\xff" + bytes([10, 1, 0, 2])
    assert pcp.address_from_bytes(pcp.address_to_bytes("10.1.0.2")) == "10.1.0.2"
    v6 = "2001:db8::1"
    assert pcp.address_to_bytes(v6) == ipaddress.IPv6Address(v6).packed
    assert pcp.address_from_bytes(pcp.address_to_bytes(v6)) == v6
    with pytest.raises(InvalidArgument):
        pcp.address_to_bytes("not an address")
    with pytest.raises(ProtocolError):
        pcp.address_from_bytes(b"\x00" * 4)


def test_pcp_map_request_layout() -> None:
    req = pcp.map_request(NONCE, "tcp", 4000, "10.1.0.2", 7200, 4001)
    assert len(req) == 60
    version, opcode, reserved, lifetime = struct.unpack_from("!BBHI", req)
    assert (version, opcode, reserved, lifetime) == (2, 1, 0, 7200)
    assert req[8:24] == pcp.address_to_bytes("10.1.0.2")
    assert req[24:36] == NONCE
    proto, internal, external = struct.unpack_from("!B3xHH", req, 36)
    assert (proto, internal, external) == (6, 4000, 4001)
    # no suggested address: the all-zeros address of the client's family (IPv4-mapped)
    assert req[44:60] == bytes(10) + b"\xff\xff" + bytes(4)
    v6 = pcp.map_request(NONCE, "udp", 5, "2001:db8::2", 0)
    assert v6[36] == 17 and v6[44:60] == bytes(16)
    suggested = pcp.map_request(NONCE, "udp", 5, "10.0.0.2", 60, 7, "198.18.0.10")
    assert pcp.address_from_bytes(suggested[44:60]) == "198.18.0.10"


def test_pcp_announce_layout() -> None:
    req = pcp.announce_request("10.1.0.2")
    assert len(req) == 24 and req[:2] == b"\x02\x00" and req[4:8] == bytes(4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"nonce": b"short"},
        {"protocol": "icmp"},
        {"internal_port": 0},
        {"lifetime": -1},
        {"client_address": "x"},
        {"suggested_external_port": 70000},
    ],
)
def test_pcp_bad_request_values(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "nonce": NONCE,
        "protocol": "tcp",
        "internal_port": 1,
        "client_address": "10.0.0.1",
        "lifetime": 10,
    }
    args.update(kwargs)
    with pytest.raises(InvalidArgument):
        pcp.map_request(**args)  # type: ignore[arg-type]


def test_pcp_parse_map_success() -> None:
    r = pcp.parse_response(pcp_response(external=4444))
    assert (r.version, r.opcode, r.result, r.lifetime, r.epoch) == (2, 1, 0, 7200, 5)
    assert r.map == pcp.MapResult(NONCE, "tcp", 4000, 4444, "198.18.0.10")
    assert r.options == ()
    udp = pcp.parse_response(pcp_response(proto=17))
    assert udp.map is not None and udp.map.protocol == "udp"
    other = pcp.parse_response(pcp_response(proto=132))
    assert other.map is not None and other.map.protocol == 132


def test_pcp_parse_options() -> None:
    opts = struct.pack("!BBH", 3, 0, 20) + bytes(20) + struct.pack("!BBH", 130, 0, 1) + b"x\0\0\0"
    r = pcp.parse_response(pcp_response(options=opts))
    assert [(o.code, len(o.data)) for o in r.options] == [(3, 20), (130, 1)]
    assert r.options[1].data == b"x"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x02\x81",
        pcp_response()[:20],  # shorter than the header
        pcp_response() + b"\x00",  # not a multiple of 4
        pcp_response()[:40],  # success without MAP payload
        pcp_response(options=struct.pack("!BBH", 1, 0, 40) + bytes(8)),  # option overruns
        pcp_response(options=b"\x01\x00"),  # truncated option header
        pcp_response(options=b"".join(struct.pack("!BBH", 9, 0, 0) for _ in range(33))),
        pcp_response(external=0),  # granted with port 0
        b"\x02\x01" + bytes(58),  # a request
        pcp_response(version=3),  # other version, result not UNSUPP_VERSION
        pcp_response(opcode=9),  # unknown opcode, success
        bytes(1200),
    ],
)
def test_pcp_rejects(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        pcp.parse_response(data)


def test_pcp_version_negotiation_answers() -> None:
    # a NAT-PMP-only server answers a PCP request with a version 0 "unsupported version"
    natpmp_answer = struct.pack("!BBHI", 0, 0x81, 1, 42)
    r = pcp.parse_response(natpmp_answer)
    assert (r.version, r.result, r.epoch, r.map) == (0, pcp.ResultCode.UNSUPP_VERSION, 42, None)
    # a server of another PCP version says which one it speaks
    r1 = pcp.parse_response(pcp_response(result=1, version=1, opcode=0))
    assert (r1.version, r1.result) == (1, pcp.ResultCode.UNSUPP_VERSION)


def test_pcp_error_without_payload_and_announce() -> None:
    r = pcp.parse_response(pcp_response(result=2, opcode=1)[:24])
    assert r.result == pcp.ResultCode.NOT_AUTHORIZED and r.map is None
    a = pcp.parse_response(pcp_response(opcode=0, epoch=77))
    assert a.opcode == pcp.Opcode.ANNOUNCE and a.epoch == 77
    assert pcp.result_name(8) == "NO_RESOURCES" and pcp.result_name(200) == "result 200"


@FUZZ
@given(st.binary(max_size=200))
def test_pcp_fuzz(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        pcp.parse_response(data)


@FUZZ
@given(st.binary(min_size=1, max_size=8), st.integers(0, 59), st.integers(0, 255))
def test_pcp_fuzz_mutations(tail: bytes, pos: int, value: int) -> None:
    data = bytearray(pcp_response() + tail)
    data[pos] = value
    with contextlib.suppress(ProtocolError):
        pcp.parse_response(bytes(data))


@FUZZ
@given(
    st.binary(min_size=12, max_size=12),
    st.sampled_from([6, 17]),
    st.integers(1, 65535),
    st.integers(1, 65535),
    st.ip_addresses(),
    st.integers(1, 2**32 - 1),
)
def test_pcp_map_response_roundtrip(
    nonce: bytes,
    proto: int,
    internal: int,
    external: int,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    lifetime: int,
) -> None:
    data = pcp_response(
        nonce=nonce,
        proto=proto,
        internal=internal,
        external=external,
        address=str(address),
        lifetime=lifetime,
    )
    r = pcp.parse_response(data)
    assert r.lifetime == lifetime and r.map is not None
    assert r.map.nonce == nonce and r.map.internal_port == internal
    assert r.map.external_port == external
    # IPv4 travels IPv4-mapped and comes back dotted: the 16 bytes are what must match
    assert pcp.address_to_bytes(r.map.external_address) == pcp.address_to_bytes(str(address))


# =============================================================================== SSDP


def test_msearch_request() -> None:
    msg = igd.msearch_request(igd.SEARCH_TARGETS[0], mx=2)
    lines = msg.decode().split("\r\n")
    assert lines[0] == "M-SEARCH * HTTP/1.1"
    assert "HOST: 239.255.255.250:1900" in lines and 'MAN: "ssdp:discover"' in lines
    assert f"ST: {igd.SEARCH_TARGETS[0]}" in lines and "MX: 2" in lines
    assert msg.endswith(b"\r\n\r\n")
    with pytest.raises(InvalidArgument):
        igd.msearch_request("x\r\nEvil: 1")
    with pytest.raises(InvalidArgument):
        igd.msearch_request("x", mx=0)


SSDP_OK = (
    b"HTTP/1.1 200 OK\r\n"
    b"CACHE-CONTROL: max-age=120\r\n"
    b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
    b"USN: uuid:1234::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
    b"EXT:\r\n"
    b"SERVER: Test/1.0 UPnP/1.1 Gateway/1.0\r\n"
    b"Location: http://10.1.0.1:5000/desc.xml\r\n"
    b"\r\n"
)


def test_parse_ssdp_response() -> None:
    r = igd.parse_ssdp_response(SSDP_OK)
    assert r.location == "http://10.1.0.1:5000/desc.xml"
    assert r.search_target.endswith("InternetGatewayDevice:1")
    assert r.usn.startswith("uuid:1234") and r.max_age == 120 and r.server.startswith("Test")
    # no final empty line: the datagram is the whole message
    assert igd.parse_ssdp_response(SSDP_OK.rstrip(b"\r\n")).location == r.location


@pytest.mark.parametrize(
    "data",
    [
        b"NOTIFY * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nLOCATION: http://1.2.3.4/\r\n\r\n",
        b"HTTP/1.1 404 Not Found\r\nLOCATION: http://1.2.3.4/\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nST: x\r\n\r\n",  # no LOCATION
        b"HTTP/1.1 200 OK\r\nLOCATION: https://10.0.0.1/d.xml\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nLOCATION: http://router.example/d.xml\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nLOCATION: http://u:p@10.0.0.1/d.xml\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nLOCATION: http://10.0.0.1:99999/d.xml\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nLOCATION: http://10.0.0.1/\x01\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 70 + b"LOCATION: http://10.0.0.1/\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nLOCATION: http://10.0.0.1/" + b"a" * 9000 + b"\r\n\r\n",
    ],
)
def test_ssdp_rejects(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        igd.parse_ssdp_response(data)


@FUZZ
@given(st.binary(max_size=300))
def test_ssdp_fuzz(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        igd.parse_ssdp_response(data)


@FUZZ
@given(st.text(max_size=80))
def test_ssdp_fuzz_location(location: str) -> None:
    data = b"HTTP/1.1 200 OK\r\nLOCATION: " + location.encode("utf-8", "replace") + b"\r\n\r\n"
    try:
        r = igd.parse_ssdp_response(data)
    except ProtocolError:
        return
    url = igd.parse_http_url(r.location)
    ipaddress.ip_address(url.host)
    assert 1 <= url.port <= 65535 and url.path.startswith("/")


def test_parse_http_url() -> None:
    u = igd.parse_http_url("http://10.1.0.1:5000/ctl/IPConn?x=1")
    assert (u.host, u.port, u.path, str(u)) == (
        "10.1.0.1",
        5000,
        "/ctl/IPConn?x=1",
        "http://10.1.0.1:5000/ctl/IPConn?x=1",
    )
    d = igd.parse_http_url("http://10.1.0.1")
    assert (d.port, d.path, d.netloc) == (80, "/", "10.1.0.1")
    v6 = igd.parse_http_url("http://[fe80::1]:80/x")
    assert v6.netloc == "[fe80::1]"
    for bad in ("http://[fe80::1%eth0]/", "http://10.1.0.1:0/", "ftp://10.0.0.1/", "http://a b/"):
        with pytest.raises(ProtocolError):
            igd.parse_http_url(bad)
    assert str(igd.resolve_url("http://10.0.0.1:80/a/desc.xml", "ctl")) == "http://10.0.0.1/a/ctl"
    assert str(igd.resolve_url("http://10.0.0.1/a/", "http://10.0.0.2:81/c")) == (
        "http://10.0.0.2:81/c"
    )


# =============================================================================== description

DESCRIPTION = b"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
  <specVersion><major>1</major><minor>1</minor></specVersion>
  <device>
    <deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:2</deviceType>
    <serviceList>
      <service>
        <serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>
        <controlURL>/ctl/L3F</controlURL>
      </service>
    </serviceList>
    <deviceList>
      <device>
        <deviceType>urn:schemas-upnp-org:device:WANDevice:2</deviceType>
        <deviceList>
          <device>
            <deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:2</deviceType>
            <serviceList>
              <service>
                <serviceType>urn:schemas-upnp-org:service:WANPPPConnection:1</serviceType>
                <controlURL>ppp</controlURL>
              </service>
              <service>
                <serviceType>urn:schemas-upnp-org:service:WANIPConnection:2</serviceType>
                <controlURL> /ctl/IPConn </controlURL>
              </service>
            </serviceList>
          </device>
        </deviceList>
      </device>
    </deviceList>
  </device>
</root>
"""


def test_parse_device_description() -> None:
    services = igd.parse_device_description(DESCRIPTION, "http://10.1.0.1:5000/rootDesc.xml")
    assert [(s.service_type.rsplit(":", 2)[1], str(s.control_url)) for s in services] == [
        ("WANIPConnection", "http://10.1.0.1:5000/ctl/IPConn"),
        ("WANPPPConnection", "http://10.1.0.1:5000/ppp"),
    ]


def test_description_url_base_and_prefixes() -> None:
    doc = b"""<r:root xmlns:r="urn:schemas-upnp-org:device-1-0"><r:URLBase>http://10.9.9.9:81/base/</r:URLBase>
    <r:device><r:serviceList><r:service>
    <r:serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</r:serviceType>
    <r:controlURL>ctl</r:controlURL></r:service></r:serviceList></r:device></r:root>"""
    (svc,) = igd.parse_device_description(doc, "http://10.1.0.1/d.xml")
    assert str(svc.control_url) == "http://10.9.9.9:81/base/ctl"


@pytest.mark.parametrize(
    "doc",
    [
        b"<root><device/></root>",  # no service
        b"<notroot/>",
        b"<root>" + b"<a>" * 40 + b"</a>" * 40 + b"</root>",  # too deep
        b"<root>" + b"<a/>" * 5000 + b"</root>",  # too many elements
        b"<root><service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1"
        b"</serviceType><controlURL>https://10.0.0.1/x</controlURL></service></root>",
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]>'
        b"<root>&lol2;</root>",
        b'<!DOCTYPE root SYSTEM "http://10.0.0.1/evil.dtd"><root/>',
        b"<root><unclosed></root>",
        b"",
        b"\xff\xfe<\x00",
        b"<root/>" + b" " * (igd.MAX_XML + 1),
    ],
)
def test_description_rejects(doc: bytes) -> None:
    with pytest.raises(ProtocolError):
        igd.parse_device_description(doc, "http://10.1.0.1/d.xml")


@FUZZ
@given(st.binary(max_size=400))
def test_description_fuzz(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        igd.parse_device_description(data, "http://10.1.0.1/d.xml")


@FUZZ
@given(st.integers(0, len(DESCRIPTION) - 1), st.binary(min_size=1, max_size=4))
def test_description_fuzz_mutations(pos: int, junk: bytes) -> None:
    data = DESCRIPTION[:pos] + junk + DESCRIPTION[pos + len(junk) :]
    with contextlib.suppress(ProtocolError):
        igd.parse_device_description(data, "http://10.1.0.1/d.xml")


@FUZZ
@given(st.text(max_size=60))
def test_description_fuzz_control_url(control: str) -> None:
    doc = (
        "<root><service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1"
        f"</serviceType><controlURL>{igd._escape(control)}</controlURL></service></root>"
    ).encode("utf-8", "surrogatepass")
    try:
        services = igd.parse_device_description(doc, "http://10.1.0.1:5000/d.xml")
    except ProtocolError:
        return
    for s in services:
        ipaddress.ip_address(s.control_url.host)


# =============================================================================== HTTP

HTTP_OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: 5\r\nServer: x\r\n\r\nhello"
)


def feed_in_pieces(data: bytes, sizes: list[int]) -> igd.HttpResponse:
    parser = igd.HttpResponseParser()
    pos = 0
    for size in sizes:
        parser.feed(data[pos : pos + size])
        pos += size
    parser.feed(data[pos:])
    parser.feed_eof()
    return parser.response()


def test_http_content_length() -> None:
    r = igd.parse_http_response(HTTP_OK + b"trailing junk after the body")
    assert (r.status, r.reason, r.body, r.headers["content-type"]) == (
        200,
        "OK",
        b"hello",
        "text/xml",
    )
    r = feed_in_pieces(HTTP_OK, [1] * len(HTTP_OK))
    assert r.body == b"hello"


def test_http_done_before_eof() -> None:
    parser = igd.HttpResponseParser()
    parser.feed(HTTP_OK)
    assert parser.done and parser.response().body == b"hello"


def test_http_chunked() -> None:
    data = (
        b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4;ext=1\r\nabcd\r\n3\r\nefg\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    r = igd.parse_http_response(data)
    assert (r.status, r.body) == (500, b"abcdefg")
    assert feed_in_pieces(data, [1] * len(data)).body == b"abcdefg"


def test_http_until_eof_and_interim() -> None:
    r = igd.parse_http_response(b"HTTP/1.0 200 OK\r\n\r\nall of it")
    assert r.body == b"all of it"
    r = igd.parse_http_response(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nX: 1\r\n\r\n"
    )
    assert (r.status, r.body, r.headers) == (204, b"", {"x": "1"})


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFF\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"SIP/2.0 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"A" * (igd.MAX_HEADER_BYTES + 10),
        b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * (igd.MAX_BODY + 1),
    ],
)
def test_http_rejects(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        igd.parse_http_response(data)


def test_http_parser_stays_failed() -> None:
    parser = igd.HttpResponseParser()
    with pytest.raises(ProtocolError):
        parser.feed(b"garbage\r\n\r\n")
    with pytest.raises(ProtocolError):
        parser.feed(HTTP_OK)
    with pytest.raises(ProtocolError):
        parser.response()


@FUZZ
@given(st.binary(max_size=300))
def test_http_fuzz(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        igd.parse_http_response(data)


@FUZZ
@given(st.lists(st.binary(max_size=40), max_size=12))
def test_http_fuzz_incremental(pieces: list[bytes]) -> None:
    parser = igd.HttpResponseParser(max_body=200)
    try:
        parser.feed(b"HTTP/1.1 200 OK\r\n")
        for piece in pieces:
            parser.feed(piece)
        parser.feed_eof()
    except ProtocolError:
        return
    assert len(parser.response().body) <= 200


@FUZZ
@given(st.lists(st.integers(1, 30), max_size=30))
def test_http_any_split_gives_the_same_response(sizes: list[int]) -> None:
    data = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"
    )
    assert feed_in_pieces(data, sizes).body == b"hello world"


# =============================================================================== SOAP

CONTROL = igd.parse_http_url("http://10.1.0.1:5000/ctl/IPConn")
WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"


def request_body(request: bytes) -> tuple[list[str], bytes]:
    head, _, body = request.partition(b"\r\n\r\n")
    return head.decode().split("\r\n"), body


def test_add_port_mapping_request() -> None:
    req = igd.add_port_mapping(
        CONTROL,
        WANIP1,
        external_port=5000,
        protocol="tcp",
        internal_port=4000,
        internal_client="10.1.0.2",
        description='crust <"&">',
        lease_duration=3600,
    )
    head, body = request_body(req)
    assert head[0] == "POST /ctl/IPConn HTTP/1.1"
    assert "Host: 10.1.0.1:5000" in head
    assert f'SOAPAction: "{WANIP1}#AddPortMapping"' in head
    assert f"Content-Length: {len(body)}" in head
    root = igd.parse_xml(body)
    action = root.iter("AddPortMapping")[0]
    args = [(c.name, c.text) for c in action.children]
    assert args == [
        ("NewRemoteHost", ""),
        ("NewExternalPort", "5000"),
        ("NewProtocol", "TCP"),
        ("NewInternalPort", "4000"),
        ("NewInternalClient", "10.1.0.2"),
        ("NewEnabled", "1"),
        ("NewPortMappingDescription", 'crust <"&">'),
        ("NewLeaseDuration", "3600"),
    ]


def test_other_action_requests() -> None:
    _, body = request_body(
        igd.delete_port_mapping(CONTROL, WANIP1, external_port=7, protocol="udp")
    )
    args = [(c.name, c.text) for c in igd.parse_xml(body).iter("DeletePortMapping")[0].children]
    assert args == [("NewRemoteHost", ""), ("NewExternalPort", "7"), ("NewProtocol", "UDP")]
    _head, body = request_body(igd.get_external_ip_address(CONTROL, WANIP1))
    assert igd.parse_xml(body).iter("GetExternalIPAddress")[0].children == []
    _, body = request_body(igd.get_generic_port_mapping_entry(CONTROL, WANIP1, 3))
    assert igd.parse_xml(body).iter("NewPortMappingIndex")[0].text == "3"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"protocol": "sctp"},
        {"external_port": 0},
        {"internal_port": 65536},
        {"internal_client": "host"},
        {"lease_duration": -1},
        {"description": "a\x00b"},
    ],
)
def test_add_port_mapping_bad_values(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "external_port": 1,
        "protocol": "tcp",
        "internal_port": 1,
        "internal_client": "10.0.0.1",
        "description": "d",
        "lease_duration": 0,
    }
    args.update(kwargs)
    with pytest.raises(InvalidArgument):
        igd.add_port_mapping(CONTROL, WANIP1, **args)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        igd.soap_request(CONTROL, "urn:other", "AddPortMapping")


def soap_body(inner: str) -> bytes:
    return (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
        f"<s:Body>{inner}</s:Body></s:Envelope>"
    ).encode()


def test_parse_soap_success() -> None:
    body = soap_body(
        f'<u:GetExternalIPAddressResponse xmlns:u="{WANIP1}">'
        "<NewExternalIPAddress>198.18.0.10</NewExternalIPAddress>"
        "</u:GetExternalIPAddressResponse>"
    )
    result = igd.parse_soap_response(200, body, "GetExternalIPAddress")
    assert isinstance(result, igd.SoapResult)
    assert igd.external_ip_from(result) == "198.18.0.10"


def test_parse_soap_fault() -> None:
    body = soap_body(
        "<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring>"
        '<detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
        "<errorCode>718</errorCode><errorDescription>ConflictInMappingEntry</errorDescription>"
        "</UPnPError></detail></s:Fault>"
    )
    fault = igd.parse_soap_response(500, body, "AddPortMapping")
    assert fault == igd.SoapFault(718, "ConflictInMappingEntry")
    bare = igd.parse_soap_response(
        500, soap_body("<s:Fault><faultstring>x</faultstring></s:Fault>"), "A"
    )
    assert bare == igd.SoapFault(None, "x")


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (404, soap_body("<u:AResponse/>")),
        (500, soap_body("<u:AResponse/>")),  # 500 without fault
        (200, soap_body("<u:OtherResponse/>")),
        (200, b"<Envelope/>"),
        (200, b"<html>no</html>"),
        (500, soap_body("<s:Fault><detail><errorCode>x7</errorCode></detail></s:Fault>")),
    ],
)
def test_parse_soap_rejects(status: int, body: bytes) -> None:
    with pytest.raises(ProtocolError):
        igd.parse_soap_response(status, body, "A")


def test_external_ip_and_entry_results() -> None:
    with pytest.raises(ProtocolError):
        igd.external_ip_from(igd.SoapResult("GetExternalIPAddress", {"NewExternalIPAddress": ""}))
    values = {
        "NewRemoteHost": "",
        "NewExternalPort": "5000",
        "NewProtocol": "TCP",
        "NewInternalPort": "4000",
        "NewInternalClient": "10.1.0.2",
        "NewEnabled": "1",
        "NewPortMappingDescription": "x",
        "NewLeaseDuration": "3600",
    }
    entry = igd.port_mapping_entry_from(igd.SoapResult("G", values))
    assert entry == igd.PortMappingEntry("", 5000, "tcp", 4000, "10.1.0.2", True, "x", 3600)
    for key, bad in (
        ("NewProtocol", "ICMP"),
        ("NewExternalPort", "70000"),
        ("NewLeaseDuration", ""),
    ):
        with pytest.raises(ProtocolError):
            igd.port_mapping_entry_from(igd.SoapResult("G", {**values, key: bad}))


@FUZZ
@given(st.integers(0, 600), st.binary(max_size=300))
def test_soap_fuzz(status: int, body: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        igd.parse_soap_response(status, body, "AddPortMapping")


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            ["NewExternalPort", "NewProtocol", "NewInternalPort", "NewLeaseDuration", "NewEnabled"]
        ),
        st.text(max_size=12),
    )
)
def test_entry_fuzz(values: dict[str, str]) -> None:
    with contextlib.suppress(ProtocolError):
        igd.port_mapping_entry_from(igd.SoapResult("G", values))


@FUZZ
@given(st.text(max_size=40))
def test_soap_request_roundtrip_of_any_description(description: str) -> None:
    clean = "".join(ch for ch in description if ord(ch) >= 0x20 and not 0xD800 <= ord(ch) <= 0xDFFF)
    clean = clean.replace("\ufffe", "").replace("\uffff", "")
    req = igd.add_port_mapping(
        CONTROL,
        WANIP1,
        external_port=1,
        protocol="udp",
        internal_port=1,
        internal_client="10.0.0.1",
        description=clean,
        lease_duration=0,
    )
    _, body = request_body(req)
    assert igd.parse_xml(body).iter("NewPortMappingDescription")[0].text == clean[:256]


# =============================================================================== grammar fuzz

XML_PIECES = [
    b"<root>", b"</root>", b"<service>", b"</service>", b"<serviceType>", b"</serviceType>",
    igd.SERVICE_TYPES[1].encode(), b"<controlURL>", b"</controlURL>", b"<URLBase>",
    b"</URLBase>", b"http://", b"10.0.0.1", b":", b"/", b"&amp;", b"&#0;", b"&#x41;",
    b"<!DOCTYPE r>", b"<?xml version='1.0' encoding='utf-16'?>",
    b"<?xml version='1.0' encoding='cp1252'?>", b"<?xml version='1.0' encoding='big5'?>",
    b"\xff", b"<![CDATA[x]]>", b"[", b"%", b"?", b"#", b" ",
]  # fmt: skip
HTTP_PIECES = [
    b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 100 Continue\r\n", b"\r\n", b"Content-Length: 3\r\n",
    b"Transfer-Encoding: chunked\r\n", b"3\r\n", b"0\r\n", b"abc",
    b"LOCATION: http://10.0.0.1:80/x\r\n", b"LOCATION: http://[::1]:x/\r\n", b"ST: a\r\n",
    b"cache-control: max-age=99999999999\r\n", b":", b"\x00",
]  # fmt: skip


@FUZZ
@given(st.lists(st.sampled_from(XML_PIECES), max_size=30).map(b"".join))
def test_description_grammar_fuzz(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        igd.parse_device_description(data, "http://10.1.0.1/d.xml")


@FUZZ
@given(st.lists(st.sampled_from(HTTP_PIECES), max_size=20).map(b"".join))
def test_http_and_ssdp_grammar_fuzz(data: bytes) -> None:
    for parse in (igd.parse_http_response, igd.parse_ssdp_response):
        with contextlib.suppress(ProtocolError):
            parse(data)


@FUZZ
@given(st.text(max_size=50))
def test_url_fuzz(text: str) -> None:
    for parse in (igd.parse_http_url, lambda t: igd.resolve_url("http://10.0.0.1/a/", t)):
        try:
            url = parse(text)
        except ProtocolError:
            continue
        ipaddress.ip_address(url.host)
        assert url.path.startswith("/")
