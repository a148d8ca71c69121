"""Malformed request bodies get a clean refusal on every protocol.

A corpus of broken bodies (wrong JSON types, absurd nesting and sizes, bad UTF-8, broken
protobuf, bad gzip, gzip bombs, broken gRPC envelopes) goes to Transact and
DeclareSessionBudget over Connect JSON and protobuf, gRPC (raw HTTP/2 and grpcio) and
gRPC-Web. Every answer must be INVALID_ARGUMENT, RESOURCE_EXHAUSTED or UNIMPLEMENTED, with
a short message free of Python internals, file paths, SQL or Lua, and nothing may be
logged with a traceback.
"""

from __future__ import annotations

import gzip
import logging
import random
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import unquote

import grpc
import httpx
import pytest

from tests.h2client import H2Client
from tests.harness import RunningBroker

METHODS = ["/ramp.broker.v1.BrokerService/Transact", "/ramp.broker.v1.BudgetService/DeclareSessionBudget"]
MiB = 1 << 20
INVALID, EXHAUSTED, UNIMPLEMENTED = "invalid_argument", "resource_exhausted", "unimplemented"
# gRPC status numbers by Connect code name.
GRPC_CODES = {"invalid_argument": 3, "resource_exhausted": 8, "unimplemented": 12, "internal": 13}
CONNECT_HTTP = {"invalid_argument": 400, "resource_exhausted": 429, "unimplemented": 501}

LEAKS = re.compile(
    r"Error|Exception|object is not|codec can't|invalid literal|maximum recursion|Traceback"
    r"|int_max_str_digits|while decompressing|NoneType|\.py\b|/usr/|site-packages"
    r"|SELECT|INSERT|(?i:sqlite)|\.lua\b|redis\.call")


@dataclass(frozen=True)
class Case:
    """A request body: `payload` in `codec`, compressed as `encoding` says (`payload` is
    then already the compressed bytes), and the code the broker must answer."""

    name: str
    payload: bytes
    codec: str = "json"
    code: str = INVALID
    encoding: str | None = None


def _gzip_bomb() -> bytes:
    # 16 MiB of zeros in ~16 KiB: inflating stops at the 1 MiB limit.
    return gzip.compress(bytes(16 * MiB), compresslevel=9)


def _json_list(item: bytes, count: int) -> bytes:
    return b"[" + b",".join([item] * count) + b"]"


CASES = [
    # JSON: wrong types
    Case("float for a string", b'{"sessionId": 1.5}'),
    Case("null body", b"null"),
    Case("top-level array", b'["a"]'),
    Case("string body", b'"x"'),
    Case("nested arrays", b'{"uris": [["a"]]}'),
    Case("number for a list", b'{"uris": 1}'),
    Case("null in a list", b'{"uris": [null]}'),
    Case("string for an object", b'{"constraints": "x"}'),
    Case("bool for a string", b'{"idempotencyKey": true}'),
    Case("list for an amount",
         b'{"limit": {"amount": ["1"]}, "constraints": {"maxPrice": {"amount": ["1"]}}}'),
    Case("float for an amount", b'{"limit": {"amount": 1.5}, "constraints": {"maxPrice": {"amount": 1.5}}}'),
    Case("object for a duration", b'{"deadline": {"seconds": 1e999}, "limit": {"currency": {}}}'),
    Case("bad duration", b'{"deadline": "forever", "limit": {"currency": 7}}'),
    Case("unknown enum name", b'{"constraints": {"deliveryPreference": ["TELEPATHY"]}, "limit": []}'),
    Case("int32 out of range",
         b'{"offers": [{"offer": {"pricing": {"estimatedQuantity": 99999999999}}}], "limit": 1}'),
    # JSON: numbers
    Case("infinity", b'{"deadline": 1e999, "limit": {"amount": 1e999}}'),
    Case("NaN literal", b'{"sessionId": NaN}'),
    Case("Infinity literal", b'{"sessionId": -Infinity}'),
    Case("5000-digit integer", b'{"deadline": ' + b"9" * 5000 + b"}"),
    Case("5000-digit integer in an int field",
         b'{"offers": [{"offer": {"pricing": {"estimatedQuantity": ' + b"9" * 5000 + b"}}}]}"),
    # JSON: sizes and nesting
    Case("100k nested arrays", b"[" * 100_000),
    Case("100k nested objects", b'{"a":' * 100_000),
    Case("1 MB field name", b'{"' + b"f" * 1_000_000 + b'": 1}'),
    Case("300k URIs", b'{"uris": ' + _json_list(b'""', 300_000) + b"}"),
    Case("1 MB array of empty strings", _json_list(b'""', 340_000)),
    Case("1 MB array of objects", _json_list(b"{}", 340_000)),
    # JSON: syntax and encoding
    Case("truncated JSON", b'{"sessionId": "a'),
    Case("empty body", b""),
    Case("invalid UTF-8", b'{"sessionId": "\xff\xfe"}'),
    Case("UTF-16", '{"sessionId": "a"}'.encode("utf-16")),
    Case("lone surrogate", b'{"sessionId": "\\ud800"}'),
    Case("duplicate key", b'{"sessionId": "a", "sessionId": "b"}'),
    Case("same field twice", b'{"sessionId": "a", "session_id": "b"}'),
    # protobuf
    Case("truncated protobuf", b"\x0a\x05ab", "proto"),
    Case("garbage protobuf", random.Random(7).randbytes(64), "proto"),
    Case("wrong wire types", b"\x08\x01\x15\x00\x00\x00\x00\x1d\x01\x02\x03\x04", "proto"),
    Case("invalid UTF-8 in a string field", b"\x0a\x02\xff\xfe", "proto"),
    Case("overlong varint", b"\x08" + b"\xff" * 11, "proto"),
    Case("invalid wire type", b"\x0e", "proto"),
    Case("field number 0", b"\x00\x01", "proto"),
    Case("deep groups", b"\x0b" * 200, "proto"),
    Case("truncated nested message", b"\x2a\x03\x12\x05ab\x12\x03\x12\x05ab", "proto"),
    Case("100k empty URIs", b"\x1a\x00" * 100_000, "proto"),
    # compression
    Case("invalid gzip", b"this is not gzip", encoding="gzip"),
    Case("truncated gzip", gzip.compress(b'{"sessionId": "a"}')[:-6], encoding="gzip"),
    Case("gzip with trailing junk", gzip.compress(b"{}") + b"junk", encoding="gzip"),
    Case("gzip bomb", _gzip_bomb(), encoding="gzip", code=EXHAUSTED),
    Case("gzip bomb (protobuf)", _gzip_bomb(), "proto", encoding="gzip", code=EXHAUSTED),
    Case("unknown compression", b"{}", encoding="br", code=UNIMPLEMENTED),
    Case("over the size limit", b'{"sessionId": "' + b"a" * MiB + b'"}', code=EXHAUSTED),
]


def envelope(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


@dataclass(frozen=True)
class Raw:
    """A whole gRPC / gRPC-Web request body (broken framing), sent as binary protobuf."""

    name: str
    body: bytes
    code: str = INVALID


ENVELOPES = [
    Raw("truncated envelope header", b"\x00\x00\x00"),
    Raw("envelope promising more", b"\x00\x00\x00\x00\x10ab"),
    Raw("trailing bytes after the envelope", envelope(b"") + b"\x00\x00"),
    Raw("end-of-stream flag", envelope(b"", 0x80)),
    Raw("unknown flag", envelope(b"", 0x02)),
    Raw("no message", b"", UNIMPLEMENTED),
    Raw("two messages", envelope(b"") + envelope(b""), UNIMPLEMENTED),
    Raw("announced length over the limit", b"\x00\xff\xff\xff\xff" + b"x" * 1000, EXHAUSTED),
    Raw("message over the limit", envelope(b"\x0a" + b"\x80\x80\x40" + b"a" * MiB), EXHAUSTED),
    # Every gRPC and Connect implementation answers INTERNAL here (grpc-go, grpc-java,
    # connect-go, connectrpc): a compressed message on a stream that declared none. The
    # message is fixed and clean.
    Raw("compressed flag without an encoding", envelope(b"ab", 0x01), "internal"),
]


def assert_clean(message: str, where: str) -> None:
    assert message, f"{where}: empty message"
    assert len(message) <= 300, f"{where}: {len(message)} characters: {message[:300]}"
    leak = LEAKS.search(message)
    assert leak is None, f"{where}: {leak.group(0)!r} in {message!r}"


def _grpc_headers(codec: str, web: bool, encoding: str | None) -> list[tuple[str, str]]:
    kind = "grpc-web" if web else "grpc"
    headers = [("content-type", f"application/{kind}+{codec}")]
    if not web:
        headers.append(("te", "trailers"))
    if encoding is not None:
        headers.append(("grpc-encoding", encoding))
    return headers


def _grpc_body(case: Case) -> bytes:
    return envelope(case.payload, 1 if case.encoding else 0)


def _web_status(response: httpx.Response) -> tuple[int | None, str]:
    """gRPC-Web status: in the headers (trailers-only) or in the body's trailer frame."""
    if "grpc-status" in response.headers:
        return int(response.headers["grpc-status"]), unquote(response.headers.get("grpc-message", ""))
    body, trailers = response.content, {}
    while len(body) >= 5:
        flags, size = struct.unpack(">BI", body[:5])
        if flags & 0x80:
            for line in body[5:5 + size].decode().split("\r\n"):
                key, _, value = line.partition(":")
                trailers[key.strip().lower()] = value.strip()
        body = body[5 + size:]
    status = trailers.get("grpc-status")
    return (int(status) if status is not None else None), unquote(trailers.get("grpc-message", ""))


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.WARNING)
    yield
    logged = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not logged, "\n".join(f"{r.name}: {r.getMessage()}" for r in logged)


def _targets() -> list[tuple[str, Case]]:
    return [(m, c) for m in METHODS for c in CASES]


@pytest.mark.usefixtures("no_tracebacks")
async def test_connect(broker: RunningBroker) -> None:
    failures: list[str] = []
    async with httpx.AsyncClient(base_url=broker.url, timeout=30) as client:
        for method, case in _targets():
            where = f"Connect {case.codec} {method.rsplit('/', 1)[1]} {case.name}"
            headers = {"content-type": f"application/{case.codec}"}
            if case.encoding:
                headers["content-encoding"] = case.encoding
            r = await client.post(method, content=case.payload, headers=headers)
            try:
                body = r.json()
                assert body["code"] == case.code, f"{where}: {body}"
                assert r.status_code == CONNECT_HTTP[case.code], f"{where}: HTTP {r.status_code}"
                assert_clean(body["message"], where)
            except (AssertionError, ValueError, KeyError) as exc:
                failures.append(f"{where}: HTTP {r.status_code} {r.text[:200]!r}: {exc}")
    assert not failures, "\n".join(failures)


@pytest.mark.usefixtures("no_tracebacks")
async def test_grpc(broker: RunningBroker) -> None:
    """Raw HTTP/2, all on one connection: early refusals must not disturb later calls."""
    failures: list[str] = []
    async with H2Client.connect("127.0.0.1", broker.port, patience=30) as h2:
        requests = [(m, c.name, _grpc_headers(c.codec, False, c.encoding), _grpc_body(c), c.code)
                    for m, c in _targets()]
        requests += [(m, r.name, _grpc_headers("proto", False, None), r.body, r.code)
                     for m in METHODS for r in ENVELOPES]
        for method, name, headers, body, code in requests:
            where = f"gRPC {headers[0][1]} {method.rsplit('/', 1)[1]} {name}"
            answer = await h2.request(method, headers, body)
            try:
                assert answer.status == 200, f"HTTP {answer.status}"
                assert answer.grpc_status == GRPC_CODES[code], f"status {answer.grpc_status}"
                assert_clean(answer.grpc_message, where)
            except AssertionError as exc:
                failures.append(f"{where}: {exc} {answer.grpc_message[:200]!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.usefixtures("no_tracebacks")
async def test_grpc_web(broker: RunningBroker) -> None:
    failures: list[str] = []
    async with httpx.AsyncClient(base_url=broker.url, timeout=30) as client:
        requests = [(m, c.name, _grpc_headers(c.codec, True, c.encoding), _grpc_body(c), c.code)
                    for m, c in _targets()]
        requests += [(m, r.name, _grpc_headers("proto", True, None), r.body, r.code)
                     for m in METHODS for r in ENVELOPES]
        for method, name, headers, body, code in requests:
            where = f"gRPC-Web {headers[0][1]} {method.rsplit('/', 1)[1]} {name}"
            r = await client.post(method, content=body, headers=dict(headers))
            status, message = _web_status(r)
            try:
                assert r.status_code == 200, f"HTTP {r.status_code}"
                assert status == GRPC_CODES[code], f"status {status}"
                assert_clean(message, where)
            except AssertionError as exc:
                failures.append(f"{where}: {exc} {message[:200]!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.usefixtures("no_tracebacks")
async def test_grpcio(broker: RunningBroker) -> None:
    """A real gRPC client sending raw bytes as the request message."""
    failures: list[str] = []
    cases = [c for c in CASES if c.codec == "proto" and c.encoding is None]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{broker.port}") as channel:
        for method in METHODS:
            call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            for case in cases:
                where = f"grpcio {method.rsplit('/', 1)[1]} {case.name}"
                try:
                    await call(case.payload, timeout=30)
                except grpc.aio.AioRpcError as err:
                    if err.code().value[0] != GRPC_CODES[case.code]:
                        failures.append(f"{where}: {err.code()} {err.details()!r}")
                        continue
                    try:
                        assert_clean(err.details() or "", where)
                    except AssertionError as exc:
                        failures.append(str(exc))
                else:
                    failures.append(f"{where}: succeeded")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(("body", "field"), [
    ({"sessionId": "s", "constraints": {"maxPrice": {"amount": 1.5}}}, "constraints.maxPrice.amount"),
    ({"uris": [f"https://x.test/{i}" for i in range(257)]}, "uris"),
    ({"uris": ["https://x.test/a", 7]}, "uris[1]"),
    ({"offers": [{"offer": {"pricing": {"estimated_quantity": 2**40}}}]},
     "offers[0].offer.pricing.estimated_quantity"),
    ({"constraints": {"budgetPeriod": "a month"}}, "constraints.budgetPeriod"),
])
async def test_a_wrongly_typed_field_is_named_with_a_field_violation(
        broker: RunningBroker, body: dict[str, object], field: str) -> None:
    r = await broker.post("BrokerService/Transact", {"idempotencyKey": "k", **body})
    assert r.status_code == 400, r.text
    answer = r.json()
    assert answer["message"].startswith(f"{field}: "), answer["message"]
    (violation,) = [d for d in answer["details"] if d["type"] == "ramp.broker.v1.FieldViolation"]
    assert violation["debug"]["field"] == field
