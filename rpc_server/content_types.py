"""Content types beyond connectrpc's: gRPC-Web text, and a 415 that says what would work.

connectrpc 0.13 speaks binary gRPC-Web only: `application/grpc-web-text` (the default mode of
the official grpc-web JavaScript client) fell through to Connect and got HTTP 415 with an
empty body, as did any other content type it does not know. The Router translates the text
form here, on every service: the request body is base64-decoded as it arrives and given to the
app as `application/grpc-web+proto` (or `+json`); the app's answer, the trailer frame
included, is base64-encoded as it leaves, as `application/grpc-web-text+proto`: each piece the
app sends (a message, the trailer frame) is encoded and padded on its own, so a stream's
message is readable at once (gRPC's PROTOCOL-WEB: padding may occur inside the body, clients
decode 4 characters at a time), and a request body may be padded inside too. A 415 now
carries a Connect error naming the supported content types, and an Accept-Post header that
lists them.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError

_WEB = b"application/grpc-web"
_TEXT = b"application/grpc-web-text"

SUPPORTED = (
    "application/json", "application/proto",  # Connect, unary RPCs
    "application/connect+json", "application/connect+proto",  # Connect, streaming RPCs
    "application/grpc", "application/grpc+proto", "application/grpc+json",  # gRPC (HTTP/2)
    "application/grpc-web", "application/grpc-web+proto", "application/grpc-web+json",
    "application/grpc-web-text", "application/grpc-web-text+proto", "application/grpc-web-text+json",
)
# Short (a refusal quotes little), the whole list is in Accept-Post.
_SUPPORTED_TEXT = ("use application/json or application/proto (Connect), application/grpc (HTTP/2), "
                   "application/grpc-web or application/grpc-web-text; Accept-Post lists every variant")


# What of a content type a refusal quotes as it is (anything else is shown as "?").
_SHOWN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/+.-_;= ")


def _content_type(headers: Any) -> bytes | None:
    for name, value in headers:
        if name == b"content-type":
            return bytes(value)
    return None


def _media(value: bytes) -> bytes:
    return value.split(b";", 1)[0].strip().lower()


def is_grpc_web_text(scope: Any) -> bool:
    ctype = _content_type(scope["headers"])
    if ctype is None:
        return False
    media = _media(ctype)
    return media == _TEXT or media.startswith(_TEXT + b"+")


class _Decoder:
    """Base64 that arrives in pieces: whole 4-character groups are decoded as they come; padding
    may end any group (a sender that encoded chunk by chunk), never part of one."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes, *, final: bool) -> bytes:
        text = self._pending + data
        usable = len(text) - len(text) % 4
        if final and usable != len(text):
            raise ConnectError(Code.INVALID_ARGUMENT,
                               "body is not base64 (application/grpc-web-text): its length is not a "
                               "multiple of 4")
        self._pending = text[usable:]
        out = []
        text = text[:usable]
        while text:
            pad = text.find(b"=")
            end = len(text) if pad < 0 else (pad // 4 + 1) * 4
            try:
                out.append(base64.b64decode(text[:end], validate=True))
            except (binascii.Error, ValueError):
                raise ConnectError(Code.INVALID_ARGUMENT,
                                   "body is not base64 (application/grpc-web-text)") from None
            text = text[end:]
        return b"".join(out)


def grpc_web_text(scope: Any, receive: Any, send: Any) -> tuple[Any, Any, Any]:
    """(scope, receive, send) with which an app that speaks binary gRPC-Web answers a gRPC-Web
    text request: the body decoded on the way in, encoded on the way out."""
    ctype = _media(_content_type(scope["headers"]) or _TEXT)
    binary = _WEB + ctype[len(_TEXT):]
    headers = [(name, binary if name == b"content-type" else value)
               for name, value in scope["headers"] if name != b"content-length"]
    decoder = _Decoder()
    encoding = False

    async def receive_binary() -> Any:
        message = await receive()
        if message["type"] == "http.request":
            body = decoder.feed(bytes(message.get("body", b"")), final=not message.get("more_body", False))
            message = {**message, "body": body}
        return message

    async def send_text(message: Any) -> None:
        nonlocal encoding
        if message["type"] == "http.response.start":
            out = []
            for name, value in message.get("headers", []):
                if name == b"content-type" and _media(value).startswith(_WEB):
                    encoding = True
                    value = _TEXT + bytes(value)[len(_WEB):]
                elif name == b"content-length":
                    continue
                out.append((name, value))
            message = {**message, "headers": out}
        elif message["type"] == "http.response.body" and encoding:
            # Each piece whole, padded: a message or the trailer frame goes out as soon as it is
            # sent (PROTOCOL-WEB: the body is base64 "chunks", padding where the runtime flushed).
            message = {**message, "body": base64.b64encode(bytes(message.get("body", b"")))}
        await send(message)

    return {**scope, "headers": headers}, receive_binary, send_text


def explain_unsupported(scope: Any, send: Any) -> Any:
    """`send` that gives a 415 (connectrpc's answer to a content type it cannot read) a Connect
    error body naming the supported content types, and the full list in Accept-Post."""
    replaced = False

    async def explained(message: Any) -> None:
        nonlocal replaced
        if message["type"] == "http.response.start" and message.get("status") == 415:
            replaced = True
            ctype = _content_type(scope["headers"])
            if ctype is None:
                problem = "no content-type given"
            else:
                shown = "".join(chr(c) if chr(c) in _SHOWN else "?" for c in ctype[:32])
                more = "..." if len(ctype) > 32 else ""
                problem = f"content-type '{shown}{more}' is not supported by this RPC"
            payload = json.dumps({"code": "unimplemented", "message": f"{problem}: {_SUPPORTED_TEXT}"},
                                 ensure_ascii=True).encode()
            headers = [(n, v) for n, v in message.get("headers", [])
                       if n.lower() not in (b"content-type", b"content-length", b"accept-post")]
            headers += [(b"content-type", b"application/json"),
                        (b"content-length", str(len(payload)).encode()),
                        (b"accept-post", ", ".join(SUPPORTED).encode())]
            await send({**message, "headers": headers})
            await send({"type": "http.response.body", "body": payload, "more_body": False})
            return
        if replaced and message["type"] == "http.response.body":
            return  # connectrpc's empty body: the payload went out already
        await send(message)

    return explained
